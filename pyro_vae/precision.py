"""bf16 mixed precision: which precision a run uses (`--precision`), and the autocast its networks run under.

Only the networks run in bf16. Parameters, Adam's state, every log-prob Pyro sums, the ELBO, the guide's scale and
every KL stay fp32: the networks' outputs are cast to fp32 where they become a distribution's parameters
(model.py, `_outputs_in_fp32`), so the probabilistic program is the same in either precision.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp32")
# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) that include a bf16 dot-product instruction (AVX512_CORE_BF16 and up)
_ONEDNN_BF16_ISAS = ("BF16", "FP16", "AMX", "AVX10", "ALL", "DEFAULT")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def bf16_is_fast(device: torch.device) -> tuple[bool, str]:
    """Whether this device runs bf16 matrix products natively, faster than fp32, and why (a few words).

    CUDA: a GPU with native bf16 (Ampere and later). CPU: the CPU has a bf16 dot product (avx512_bf16 or amx_bf16),
    and torch is allowed to use it: its kernels' capability (ATEN_CPU_CAPABILITY) is AVX512 and oneDNN's
    (ONEDNN_MAX_CPU_ISA) includes bf16. Elsewhere bf16 is emulated, slower than fp32.
    """
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} has native bf16"
        return False, "this GPU has no native bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for device {device.type}"
    flags = _cpu_flags() & {"avx512_bf16", "amx_bf16"}
    if not flags:
        return False, "this CPU has no bf16 dot product (neither avx512_bf16 nor amx_bf16)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return False, f"torch's CPU kernels run at {capability} here (ATEN_CPU_CAPABILITY), not AVX512"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not any(name in isa for name in _ONEDNN_BF16_ISAS):
        return False, f"oneDNN is limited to {isa} (ONEDNN_MAX_CPU_ISA), which has no bf16"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "torch's oneDNN reports no bf16 support"
    return True, f"the CPU has {' and '.join(sorted(flags))}"


def resolve(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision a run uses, bf16 or fp32, for --precision `precision` on `device`, and why."""
    if precision != "auto":
        return precision, "as asked"
    fast, why = bf16_is_fast(torch.device(device))
    return ("bf16" if fast else "fp32"), why


def autocast(precision: str, device: torch.device, cache_enabled: bool = True):
    """The context the networks run in: bf16 autocast for precision "bf16", nothing for "fp32".

    cache_enabled=False inside a CUDA graph's capture: autocast's cache of bf16 weights would be freed after it.
    """
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be bf16 or fp32 once resolved, not {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
