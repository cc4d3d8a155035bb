"""log p(x) of shipped runs in fp32 and under bf16 autocast, on the same images with the same seeds (issue 40,
point 3: evaluate may use bf16 only where the two agree within 0.05 nats).

    OMP_NUM_THREADS=1 uv run python benchmarks/bf16_evaluate.py IMAGES K RUN [RUN ...]
"""
import sys
import time
import torch
import pyro
import pyro_vae
from pyro_vae.evaluate import importance_estimates
from pyro_vae.precision import autocast
from pyro_vae.datasets import load_data
n, k = int(sys.argv[1]), int(sys.argv[2])
for name in sys.argv[3:]:
    run = pyro_vae.load(name)
    data = load_data(run.config)
    x = data.test_images[:n]
    out = {}
    for precision in ("fp32", "bf16"):
        t = time.perf_counter()
        vals = []
        for b in range(0, n, 100):
            pyro.set_rng_seed(b)
            with autocast(precision, torch.device("cpu")):
                vals.append(importance_estimates(run.vae, x[b:b+100], None, num_samples=k, chunk=k).log_px)
        out[precision] = torch.cat(vals).double()
        print(name, precision, f"{out[precision].mean().item():.4f}", f"{time.perf_counter()-t:.1f}s", flush=True)
    d = out["bf16"] - out["fp32"]
    print(name, f"mean diff {d.mean().item():+.4f} nats, max |diff| per image {d.abs().max().item():.4f}, "
          f"sd of diff {d.std().item():.4f}", flush=True)
