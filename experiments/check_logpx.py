"""A second log p(x) of a trained run, written apart from `pyro_vae.evaluate` (issue 39's check of a shipped row).

    uv run python experiments/check_logpx.py pretrained/pixelcnn_flow_iaf --limit 200 --k 1000

Plain importance sampling: each image is repeated k times along the batch (not in a samples plate, as evaluate
draws them), z ~ q(z | x) from the run's own guide, the model replayed on those draws, and
log p(x) ~ logsumexp_k(log p(x, z_k) - log q(z_k | x)) - log k from the traces' site log-probs. It then runs
`pyro_vae.evaluate.importance_estimates` on the same images with other draws and prints both means, each with its
standard error over the images, and their difference.
"""

import argparse
import math
import sys

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

import pyro_vae
from pyro_vae.datasets import load_data
from pyro_vae.evaluate import importance_estimates


@torch.no_grad()
def log_px_plain(vae, x: torch.Tensor, k: int, draws_per_pass: int) -> torch.Tensor:
    """log p(x) of each image of x (one at a time, draws_per_pass copies a pass), shape (len(x),)."""
    out = []
    for image in x:
        log_w = []
        for start in range(0, k, draws_per_pass):
            n = min(draws_per_pass, k - start)
            copies = image.expand(n, *image.shape).contiguous()
            guide = poutine.trace(vae.guide).get_trace(copies)
            model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(copies)
            total = torch.zeros(n, dtype=torch.float64)
            for trace, sign in ((model, 1.0), (guide, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] != "sample" or site_is_subsample(site):
                        continue
                    log_prob = site["fn"].log_prob(site["value"])  # unscaled: no N / B, no KL weight
                    total += sign * log_prob.double().reshape(n, -1).sum(1)
            log_w.append(total)
        out.append(torch.logsumexp(torch.cat(log_w), 0) - math.log(k))
    return torch.stack(out)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory, or pretrained/NAME")
    parser.add_argument("--limit", type=int, default=200, help="the first N test images")
    parser.add_argument("--k", type=int, default=1000, help="importance samples an image")
    parser.add_argument("--draws-per-pass", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    run = pyro_vae.load(args.run, device="cpu")
    x = load_data(run.config, split="test").test_images[:args.limit]
    pyro.set_rng_seed(args.seed)
    plain = mean_and_stderr(log_px_plain(run.vae, x, args.k, args.draws_per_pass))
    pyro.set_rng_seed(args.seed + 1)
    theirs = mean_and_stderr(importance_estimates(run.vae, x, None, num_samples=args.k, chunk=250).log_px.double())
    print(f"{args.run}: first {len(x)} test images, K = {args.k}")
    print(f"  plain importance sampling (this script): {plain[0]:.3f} +- {plain[1]:.3f} nats")
    print(f"  pyro_vae.evaluate.importance_estimates:  {theirs[0]:.3f} +- {theirs[1]:.3f} nats")
    print(f"  difference: {plain[0] - theirs[0]:+.3f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
