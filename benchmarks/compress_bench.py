"""The codec's rate against its time: encode and decode the same test images with each K (importance samples per
image), alternately, `repeats` times; per K the file's bits per pixel, the bound it coded at, the median encode and
decode seconds (and their spread) and their ratio to K = 1's in the same run, the yardstick. Every round trip is
checked.

    uv run python -m benchmarks.compress_bench pretrained/conv32 --k 1 4 8 16 32 --limit 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from pyro_vae import compress
from pyro_vae.checkpoint import CheckpointError
from pyro_vae.data import DataError


def time_codec(trained, path: str, images: np.ndarray, labels, k: int, widen: float | None = None) -> dict:
    """One encode and one decode with k samples: seconds of each, the file's and the bound's bits per image."""
    started = time.perf_counter()
    data, bound = compress._encode(trained, path, images, labels, k=k, widen=widen, progress=False)
    encoded = time.perf_counter()
    restored, restored_labels = compress.decode(trained, data, labels=True, progress=False)
    decoded = time.perf_counter()
    if not np.array_equal(restored, images) or (labels is not None and not np.array_equal(restored_labels, labels)):
        raise SystemExit(f"K = {k}: the round trip is not exact")
    return {"encode_s": encoded - started, "decode_s": decoded - encoded, "file_bits": 8 * len(data) / len(images),
            "bound_bits": float(bound.mean())}


def compare(run: str, ks: list[int], limit: int, repeats: int, data_dir: str | None = None,
            widen: float | None = None) -> dict:
    """Each K in turn, `repeats` rounds; per K the medians, spreads and ratios to the first K's times."""
    trained, path = compress._load(run, max(ks))
    images, labels = compress.binarized_test_split(trained, limit, data_dir)
    labels = labels if trained.vae.conditional else None
    times = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            times[k].append(time_codec(trained, path, images, labels, k, widen if k > 1 else None))
    rows = {}
    for k, runs in times.items():
        row = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        row |= {f"{name}_range": [min(r[name] for r in runs), max(r[name] for r in runs)]
                for name in ("encode_s", "decode_s")}
        rows[k] = row
    first = rows[ks[0]]
    for row in rows.values():
        row["time_over_first"] = (row["encode_s"] + row["decode_s"]) / (first["encode_s"] + first["decode_s"])
    return {"run": run, "images": len(images), "repeats": repeats, "k": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compress_bench", description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--limit", type=int, default=1000, help="test images (0: all 10,000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widen", type=float, default=None,
                        help="the proposal's widening for K > 1 (default: the codec's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        result = compare(args.run, args.k, args.limit, args.repeats, args.data_dir, args.widen)
    except (compress.CompressError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pixels = compress.PIXELS
    print(f"{result['run']}: {result['images']} test images, {result['repeats']} rounds, every round trip exact")
    yardstick = f"time / K={args.k[0]}"
    print(f"{'K':>4} {'file bpp':>9} {'bound bpp':>10} {'encode s':>18} {'decode s':>18} {yardstick:>10}")
    for k, row in result["k"].items():
        spread = {name: "{:.1f} ({:.1f}-{:.1f})".format(row[name], *row[f"{name}_range"])
                  for name in ("encode_s", "decode_s")}
        print(f"{k:>4} {row['file_bits'] / pixels:9.4f} {row['bound_bits'] / pixels:10.4f} {spread['encode_s']:>18} "
              f"{spread['decode_s']:>18} {row['time_over_first']:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
