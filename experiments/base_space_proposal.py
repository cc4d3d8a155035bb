"""How well a Gaussian in the flow prior's base space serves as the codec's importance proposal (issue 39).

The codec codes a flow-prior run's latent as the prior's base e (z = g(e), prior N(0, I)) with a Gaussian r(e | x)
fitted to the guide's draws carried through g^-1 (pyro_vae.compress, _Program.proposal). This measures, without
the bins, the single-sample bound and -IWAE_K of that r (diagonal, or with the full covariance the codec uses) at
a few widenings, beside the guide's own in z, on the first N test images:

    uv run python experiments/base_space_proposal.py pretrained/pixelcnn_flow_iaf --images 100

Each figure averages `--groups` independent K-draw estimates per image; all in nats per image.
"""

from __future__ import annotations

import argparse
import math

import torch

import pyro_vae
from pyro_vae.compress import FIT_SEED, _Program
from pyro_vae.compress.cli import binarized_test_images


def log_likelihood(program: _Program, x: torch.Tensor, z: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """log p(x | z) for draws z (S, B, D): (S, B)."""
    parts = []
    for start in range(0, len(z), chunk):
        part = z[start:start + chunk]
        parts.append(program.site("model", "x", x, None, {"z": part}, samples=len(part)).log_prob(x).double())
    return torch.cat(parts)


def proposals(e: torch.Tensor, widenings: list[float]) -> dict[str, torch.distributions.Distribution]:
    """Gaussians fitted to draws e (M, B, D): diagonal and full covariance, each at every widening."""
    mean, deviation = e.mean(0), e - e.mean(0)
    covariance = torch.einsum("mbi,mbj->bij", deviation, deviation) / (len(e) - 1)
    tril = torch.linalg.cholesky(covariance + 1e-8 * torch.eye(e.shape[-1], dtype=e.dtype))
    fitted = {}
    for widen in widenings:
        fitted[f"diagonal x {widen}"] = torch.distributions.Independent(
            torch.distributions.Normal(mean, e.std(0) * widen), 1)
        fitted[f"full x {widen}"] = torch.distributions.MultivariateNormal(mean, scale_tril=tril * widen)
    return fitted


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--fit-draws", type=int, default=1024)
    parser.add_argument("--widen", type=float, nargs="+", default=[1.0, 1.1, 1.2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = pyro_vae.load(args.run, device="cpu")
    program = _Program(run, {})
    if program.to_z is None:
        parser.error(f"{args.run} has no flow prior: its latent is coded as itself")
    images = torch.from_numpy(binarized_test_images(run, args.images)).float().unsqueeze(1)
    draws, base = args.k * args.groups, torch.distributions.Normal(0.0, 1.0)
    log_w: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        torch.manual_seed(1)
        for start in range(0, len(images), 50):
            x = images[start:start + 50]
            q, prior = program.site("guide", "z", x, None, {}), program.site("model", "z", x, None, {})
            z = q.sample((draws,))
            log_w.setdefault("the guide itself, in z", []).append(
                log_likelihood(program, x, z) + prior.log_prob(z).double() - q.log_prob(z).double())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(FIT_SEED)
                e = program.to_z.inv(q.sample((args.fit_draws,))).double()
            for name, r in proposals(e, args.widen).items():
                sample = r.sample((draws,))
                log_w.setdefault(name, []).append(log_likelihood(program, x, program.to_z(sample.float()))
                                                  + base.log_prob(sample).sum(-1) - r.log_prob(sample))
    print(f"{args.run}, first {args.images} test images, K = {args.k}, {args.groups} groups, "
          f"r fitted to {args.fit_draws} draws")
    for name, parts in log_w.items():
        w = torch.cat(parts, 1)
        iwae = (w.reshape(args.groups, args.k, -1).logsumexp(1) - math.log(args.k)).mean().item()
        print(f"  {name:24s} ELBO {w.mean().item():9.3f}   IWAE_{args.k} {iwae:9.3f}   "
              f"({-iwae / math.log(2) / 784:.4f} bits per pixel)")


if __name__ == "__main__":
    main()
