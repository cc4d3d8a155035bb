"""Evaluation from model and guide traces: test ELBO, importance-sampled log p(x), KL, active units.

`python -m pyro_vae.evaluate RUN` is a thin shell over `evaluate_run(...)`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from .checkpoint import CheckpointError, load, run_directory
from .config import default_device
from .data import DataError, load_mnist
from .trained import TrainedVAE

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): a unit is active when Cov_x(E_q[z_d | x]) exceeds this


def _log_prob(trace) -> torch.Tensor:
    """Sum of the log-probs of a trace's sample sites, one value per (sample, image).

    Unscaled: neither the minibatch factor N / B nor a KL weight enters a reported figure.
    """
    trace.compute_log_prob()
    return sum(site["unscaled_log_prob"] for site in trace.nodes.values()
               if site["type"] == "sample" and not site_is_subsample(site))


def _likelihood_log_prob(trace) -> torch.Tensor:
    """log p(x | z): the unscaled log-prob of the observed site "x" of a model trace whose log-probs are computed."""
    return trace.nodes["x"]["unscaled_log_prob"]


def _latent_log_ratio(model_trace, guide_trace) -> torch.Tensor:
    """log q(z | x) - log p(z) at the drawn z, from the latent sites z (z2, ... in a hierarchy) alone.

    Its mean over z ~ q is KL(q(z | x) || p(z)); for the label-conditioned model KL(q(z | x, y) || p(z | y)),
    leaving out the label's own terms log p(y) (and, where y is inferred, log q(y | x)). The traces' log-probs
    are computed.
    """
    latents = [name for name, site in guide_trace.nodes.items()
               if site["type"] == "sample" and not site_is_subsample(site) and name != "y"]
    return sum(guide_trace.nodes[name]["unscaled_log_prob"] - model_trace.nodes[name]["unscaled_log_prob"]
               for name in latents)


def _traces(model_guide, x: torch.Tensor, y: torch.Tensor | None, num_samples: int):
    """Guide trace and the model trace replayed on it, num_samples draws of z vectorized in a plate at dim -2."""
    with pyro.plate("samples", num_samples, dim=-2):
        guide_trace = poutine.trace(model_guide.guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model_guide.model, trace=guide_trace)).get_trace(x, y)
    return model_trace, guide_trace


@torch.no_grad()
def log_weights(vae, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 1) -> torch.Tensor:
    """log p(x, z) - log q(z | x) for num_samples draws z ~ q(z | x), vectorized: shape (num_samples, B)."""
    model_trace, guide_trace = _traces(vae, x, y, num_samples)
    return (_log_prob(model_trace) - _log_prob(guide_trace)).reshape(num_samples, -1)


@torch.no_grad()
def elbo_per_image(vae, images: torch.Tensor, labels: torch.Tensor | None = None,
                   batch_size: int = 1000) -> torch.Tensor:
    """Single-sample ELBO of each image in nats, shape (N,); the figure the training log reports."""
    values = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        y = None if labels is None else labels[start:start + batch_size]
        values.append(log_weights(vae, x, y)[0])
    return torch.cat(values)


class Estimates(NamedTuple):
    """Per-image estimates in nats, each (B,)."""

    log_px: torch.Tensor  # log (1/K) sum_k w_k: the importance-sampled log p(x), a lower bound that tightens with K
    elbo: torch.Tensor  # (1/K) sum_k log w_k: the ELBO, averaged over the same K draws
    reconstruction: torch.Tensor  # (1/K) sum_k log p(x | z_k): the reconstruction term of the ELBO
    kl: torch.Tensor  # (1/K) sum_k log q(z_k | x) - log p(z_k): the KL term of the ELBO, from the z sites alone


@torch.no_grad()
def importance_estimates(model_guide, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 1000,
                         chunk: int = 100) -> Estimates:
    """log p(x), ELBO, reconstruction and KL term of each image from num_samples draws of z ~ q(z | x).

    model_guide is anything with `.model(x, y)` and `.guide(x, y)` whose data plate is at dim -1; the draws
    are made `chunk` at a time and combined with a running logsumexp, so memory does not grow with K.
    """
    running = sums = None
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        model_trace, guide_trace = _traces(model_guide, x, y, n)
        log_w = (_log_prob(model_trace) - _log_prob(guide_trace)).reshape(n, -1)  # (n, B)
        terms = [log_w, _likelihood_log_prob(model_trace),  # site log-probs computed by _log_prob above
                 _latent_log_ratio(model_trace, guide_trace)]
        chunk_sums = [t.expand_as(log_w).sum(0) for t in terms]  # elbo, reconstruction, kl: (B,) each
        if running is None:
            running, sums = log_w.logsumexp(0), chunk_sums
        else:
            running, sums = torch.logaddexp(running, log_w.logsumexp(0)), [a + b for a, b in zip(sums, chunk_sums)]
    return Estimates(running - math.log(num_samples), *(total / num_samples for total in sums))


@torch.no_grad()
def log_joint(model_guide, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x, z) of each image at each of G latent points z (G, B, latent_dim): shape (G, B).

    For models whose only latent site is "z" (with a label y, the label-conditioned model given y).
    """
    with pyro.plate("samples", z.shape[0], dim=-2):
        trace = poutine.trace(poutine.condition(model_guide.model, data={"z": z})).get_trace(x, y)
    return _log_prob(trace).reshape(z.shape[0], -1)


@torch.no_grad()
def posterior_on_grid(model_guide, x: torch.Tensor, axes: list[torch.Tensor], y: torch.Tensor | None = None,
                      chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The true posterior p(z | x) on a regular grid, by normalizing the model joint over the grid.

    axes: one evenly spaced 1-D tensor of coordinates per latent dimension (the grid is their product).
    Returns the log density at each grid point, (B, len(axes[0]), len(axes[1]), ...), and log p(x) by
    quadrature, (B,); both are good only where the grid covers the posterior's mass.
    """
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes))  # (G, latent_dim)
    joint = torch.cat([log_joint(model_guide, x, grid[i:i + chunk, None].expand(-1, len(x), -1), y)
                       for i in range(0, len(grid), chunk)])  # (G, B)
    log_cell = sum(math.log((a[-1] - a[0]).item() / (len(a) - 1)) for a in axes)
    log_px = joint.logsumexp(0) + log_cell
    log_density = (joint - log_px).T.reshape(len(x), *(len(a) for a in axes))
    return log_density, log_px


@torch.no_grad()
def guide_on_grid(model_guide, x: torch.Tensor, axes: list[torch.Tensor], y: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """log q(z | x) of each image on the grid that axes span, (B, len(axes[0]), len(axes[1]), ...)."""
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 1, len(axes))  # (G, 1, D)
    q = poutine.trace(model_guide.guide).get_trace(x, y).nodes["z"]["fn"]  # batch (B,), event (D,)
    return q.log_prob(grid).T.reshape(len(x), *(len(a) for a in axes))


class GridPosterior(NamedTuple):
    """The true posterior and the guide of one image on a grid over a 2-D latent."""

    axes: list[torch.Tensor]  # coordinates along z_0 and z_1
    log_p: torch.Tensor  # (n, n) log p(z | x), normalized over the grid
    log_q: torch.Tensor  # (n, n) log q(z | x)
    log_px: float  # log p(x) by quadrature
    kl: float  # KL(q || p) by quadrature: log p(x) - ELBO


def _window(log_densities: list[torch.Tensor], axes: list[torch.Tensor], within: float = 12.0) -> list[tuple]:
    """Limits (lo, hi) per dimension around the grid cells where any of the densities is within e^-within of its
    maximum, one cell wider on each side."""
    mass = torch.stack([d > d.max() - within for d in log_densities]).any(0)
    limits = []
    for dim, axis in enumerate(axes):
        where = axis[mass.any(dim=tuple(i for i in range(mass.ndim) if i != dim))]
        step = (axis[1] - axis[0]).item()
        limits.append((where.min().item() - step, where.max().item() + step))
    return limits


@torch.no_grad()
def grid_posteriors(model_guide, x: torch.Tensor, y: torch.Tensor | None = None, coarse: int = 81, fine: int = 61,
                    extent: float = 4.0) -> list[GridPosterior]:
    """For a 2-D latent: p(z | x) and q(z | x) of each image on a fine grid where they have their mass.

    A coarse grid over [-extent, extent]^2 finds where p(z | x) and q(z | x) live; a fine n x n grid
    around that region is where both are computed and compared.
    """
    coarse_axes = [torch.linspace(-extent, extent, coarse, device=x.device)] * 2
    coarse_p, _ = posterior_on_grid(model_guide, x, coarse_axes, y)
    coarse_q = guide_on_grid(model_guide, x, coarse_axes, y)
    results = []
    for i in range(len(x)):
        x_i, y_i = x[i:i + 1], None if y is None else y[i:i + 1]
        limits = _window([coarse_p[i], coarse_q[i]], coarse_axes)
        axes = [torch.linspace(lo, hi, fine, device=x.device) for lo, hi in limits]
        log_p, log_px = posterior_on_grid(model_guide, x_i, axes, y_i)
        log_q = guide_on_grid(model_guide, x_i, axes, y_i)
        cell = math.prod((a[1] - a[0]).item() for a in axes)
        kl = (log_q.exp() * (log_q - log_p)).sum().item() * cell
        results.append(GridPosterior([a.cpu() for a in axes], log_p[0].cpu(), log_q[0].cpu(), log_px.item(), kl))
    return results


@torch.no_grad()
def posterior_params(run, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loc and scale of the encoder's Gaussian q(z | x) for a loaded run, each (B, latent_dim).

    The label-conditioned model is given the labels y; the semi-supervised one uses q(y | x)'s guess.
    """
    if not getattr(run, "labels_observed", False):
        y = None
    if y is None and getattr(run.vae, "classifier", None) is not None:
        y = run.classify(x)
    return run.encode(x, y)


def kl_to_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, scale^2) || N(0, 1)) per dimension, in nats, the shape of loc."""
    return 0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()


@torch.no_grad()
def layer_figures(vae, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 100
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per latent layer z_1 .. z_L of a hierarchical VAE: its KL term and its posterior mean, from num_samples draws.

    The KL term is E_q[log q(z_l | ...) - log p(z_l | z_l+1)] per image, (B,); the terms sum to the whole KL.
    The mean E_q[z_l | x], (B, width), averages the guide's conditional means over the draws of the layers it
    depends on (exact for z_1 of the bottom-up guide and z_L of the ladder's), so its noise is small.
    """
    model_trace, guide_trace = _traces(vae, x, y, num_samples)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    figures = []
    for site in vae.sites:
        q, p = guide_trace.nodes[site], model_trace.nodes[site]
        kl = (q["unscaled_log_prob"] - p["unscaled_log_prob"]).reshape(num_samples, -1).mean(0)
        try:
            mean = q["fn"].mean
        except NotImplementedError:  # a flow (the iaf guide on z_1) has no closed-form mean: average the draws
            mean = q["value"]
        figures.append((kl, mean.expand_as(q["value"]).reshape(num_samples, len(x), -1).mean(0)))
    return figures


def _layer_summaries(vae, per_batch: list) -> list[dict]:
    """evaluate_run's per-layer rows from layer_figures of each batch: KL, active units, width."""
    rows = []
    for site, layer in zip(vae.sites, zip(*per_batch)):
        kl = torch.cat([k for k, _ in layer]).double().cpu()
        mean = torch.cat([m for _, m in layer]).double().cpu()
        variance = mean.var(dim=0) if len(mean) > 1 else torch.zeros(mean.shape[1], dtype=mean.dtype)
        rows.append({"site": site, "width": mean.shape[1], "kl": _summary(kl),
                     "active_units": int((variance > ACTIVE_UNIT_THRESHOLD).sum())})
    return rows


def _summary(values: torch.Tensor) -> dict:
    n = len(values)
    stderr = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": values.mean().item(), "stderr": stderr}


def evaluate_run(run, *, k: int = 1000, limit: int = 0, batch_size: int = 100, chunk: int = 100, seed: int = 0,
                 device: str | None = None, data_dir: str | None = None, progress: bool | None = None) -> dict:
    """Evaluate a run (a path, or a run from `pyro_vae.load`) on its own test set; return the figures.

    `limit` keeps the first N test images (0: all); each image gets k draws from q(z | x), `chunk` at a time.
    """
    started = time.perf_counter()
    path = None
    if not isinstance(run, TrainedVAE):
        path, run = str(run), load(run, device=device or default_device())
    config, device = run.config, run.device
    # the test split exactly as training reported it; the training images are not read
    data = load_mnist(data_dir or config.data_dir, binarize=config.binarize, device=device,
                      download=config.download, test_size=config.test_size, split="test")
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    labels_observed = getattr(run, "labels_observed", False)  # the label-conditioned model is told y

    per_image = {name: [] for name in Estimates._fields}
    locs, kls, layers = [], [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        bar = tqdm(total=len(images), desc=f"log p(x), K={k}", unit="img",
                   disable=None if progress is None else not progress)
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            y = labels[start:start + batch_size] if labels_observed else None
            estimates = importance_estimates(run.vae, x, y, num_samples=k, chunk=chunk)
            for name, values in estimates._asdict().items():
                per_image[name].append(values)
            loc, scale = posterior_params(run, x, y)  # (B, latent_dim) each
            locs.append(loc)
            kls.append(kl_to_standard_normal(loc, scale))
            if len(run.vae.sites) > 1:
                layers.append(layer_figures(run.vae, x, y))
            bar.update(len(x))
        bar.close()

    log_px, elbo, reconstruction, kl = (torch.cat(per_image[name]).double().cpu() for name in Estimates._fields)
    # ELBO = reconstruction - KL + the label's terms: log p(y) where y is observed (log 1/10),
    # E_q[log p(y) - log q(y | x)] = -KL(q(y | x) || p(y)) where q(y | x) infers it, nothing without a label
    label_terms = elbo - reconstruction + kl
    if not config.conditional:
        label = {}
    elif labels_observed:
        label = {"log_py": _summary(label_terms)}
    else:
        label = {"kl_y": _summary(-label_terms)}
    loc = torch.cat(locs).double().cpu()
    mean_variance = loc.var(dim=0) if len(loc) > 1 else torch.zeros(loc.shape[1], dtype=loc.dtype)
    active = mean_variance > ACTIVE_UNIT_THRESHOLD
    return {
        "run": path or config.out, "epoch": run.epoch,
        "k": k, "num_images": len(images), "num_test_images": len(data.test_images),
        "seed": seed, "device": str(device), "batch_size": batch_size, "chunk": chunk,
        "latent_dim": config.latent_dim, "binarize": config.binarize, "conditional": config.conditional,
        "labels_observed": labels_observed,
        "prior": config.prior, "likelihood": config.likelihood, "guide": config.guide,
        "elbo": _summary(elbo),
        "log_px": _summary(log_px),
        "reconstruction": _summary(reconstruction),  # E_q[log p(x | z)] (conditional: log p(x | z, y))
        "kl": _summary(kl),  # KL(q(z | x) || p(z)) for whatever prior; conditional: KL(q(z | x, y) || p(z | y))
        **label,
        "gap": _summary(log_px - elbo),  # how far the K-sample bound rises above the ELBO
        "kl_per_dim_to_standard_normal": torch.cat(kls).double().mean(0).cpu().tolist(),
        "posterior_mean_variance": mean_variance.tolist(),
        "active_units": int(active.sum()),
        "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
        "seconds": time.perf_counter() - started,
        **({"layers": _layer_summaries(run.vae, layers)} if layers else {}),
    }


def format_table(results: dict) -> str:
    """The figures of `evaluate_run` as a plain-text table."""
    r = results
    used = f"{r['num_images']} of {r['num_test_images']} test images"
    lines = [
        f"pyro_vae.evaluate: {r['run']} (epoch {r['epoch']}; prior {r['prior']}, likelihood {r['likelihood']}, "
        f"guide {r['guide']})",
        f"  {used}, K = {r['k']} draws from q(z|x) per image, seed {r['seed']}, {r['device']}, "
        f"{r['seconds']:.1f} s",
        "",
        f"  {'nats per image':42s} {'mean':>9s} {'std. err.':>9s}",
    ]
    # told the test labels, the label-conditioned model's figures are of the joint: log p(x, y) <= log p(x)
    joint = "x, y" if r.get("labels_observed") else "x"
    conditional = r.get("conditional")
    rows = [
        (f"test ELBO of log p({joint})", "elbo"),
        (f"log p({joint}), importance-sampled (K = {r['k']})", "log_px"),
        ("reconstruction E_q[log p(x|z,y)]" if conditional else "reconstruction E_q[log p(x|z)]", "reconstruction"),
        ("KL(q(z|x,y) || p(z|y))" if conditional else "KL(q(z|x) || p(z))", "kl"),
        ("log p(y) of the observed label", "log_py"),
        ("KL(q(y|x) || p(y))", "kl_y"),
        (f"log p({joint}) - ELBO", "gap"),
    ]
    rows = [(label, key) for label, key in rows if key in r]
    for label, key in rows:
        lines.append(f"  {label:42s} {r[key]['mean']:9.2f} {r[key]['stderr']:9.2f}")
    if r["guide"] == "delta":
        lines.append("  note: q(z|x) is a point mass (--guide delta): these are log p(x, z*), not bounds on log p(x)")
    if r.get("layers"):  # a hierarchical VAE: the KL and active units of each layer; the table below is z's
        lines += ["", f"  {'per stochastic layer (z is z_1)':32s} {'KL nats':>9s} {'std. err.':>9s} {'active units':>14s}"]
        lines += [f"  {row['site']:32s} {row['kl']['mean']:9.2f} {row['kl']['stderr']:9.2f} "
                  f"{row['active_units']:>7d} of {row['width']}" for row in r["layers"]]
        lines.append("")
    base = {"iaf": " of the flow's base Gaussian", "ladder": " of z's bottom-up Gaussian (before the merge)"
            }.get(r["guide"], "")
    lines += [
        f"  {'active units (Cov_x E_q[z_d] > %g)' % r['active_unit_threshold']:42s} "
        f"{r['active_units']:>9d} of {r['latent_dim']}",
        "",
        f"  per latent dimension{base}, by KL to N(0, 1) (the standard normal, whatever the prior):",
        f"  {'dim':>5s} {'KL to N(0,1)':>13s} {'Cov_x E_q[z_d]':>15s} {'active':>7s}",
    ]
    kl, var = r["kl_per_dim_to_standard_normal"], r["posterior_mean_variance"]
    for d in sorted(range(len(kl)), key=lambda d: -kl[d]):
        active = "yes" if var[d] > r["active_unit_threshold"] else "-"
        lines.append(f"  {d:5d} {kl[d]:13.3f} {var[d]:15.4f} {active:>7s}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_vae.evaluate",
        description="Evaluate a trained run on its test set: ELBO, importance-sampled log p(x), KL, active units. "
                    "Writes RUN/evaluation.json and prints a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--k", type=int, default=1000, help="draws from q(z|x) per image for log p(x)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N test images (0: all)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per batch")
    parser.add_argument("--chunk", type=int, default=100,
                        help="draws of z per forward pass; memory grows with batch size x chunk")
    parser.add_argument("--seed", type=int, default=0, help="seed for the draws of z")
    parser.add_argument("--device", default=default_device(), help="torch device (cuda when available, else cpu)")
    parser.add_argument("--data-dir", default=None, help="where MNIST is unpacked (default: the run's --data-dir)")
    parser.add_argument("--out", default=None, help="JSON file to write (default: RUN/evaluation.json)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value, minimum in (("--k", args.k, 1), ("--chunk", args.chunk, 1),
                                 ("--batch-size", args.batch_size, 1), ("--limit", args.limit, 0)):
        if value < minimum:
            parser.error(f"{flag} must be at least {minimum}, not {value}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], not {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for, but this machine has no CUDA device; use --device cpu")
    try:
        results = evaluate_run(args.run, k=args.k, limit=args.limit, batch_size=args.batch_size, chunk=args.chunk,
                               seed=args.seed, device=args.device, data_dir=args.data_dir)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else run_directory(args.run) / "evaluation.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"pyro_vae: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
