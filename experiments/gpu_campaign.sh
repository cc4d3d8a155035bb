#!/usr/bin/env bash
# The GPU campaign on a lent machine (docs/gpu.md): install the carried Pyro wheels, then run or continue it.
# Extra arguments go to experiments/campaign.py (a second call: --budget N, N = the window's time left - 60 s).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 experiments/campaign.py --out "${OUT:?the device tool sets OUT}" --state .campaign "$@"
