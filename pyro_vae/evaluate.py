"""Evaluation from model and guide traces: test ELBO, importance-sampled log p(x), KL, active units.

`python -m pyro_vae.evaluate RUN` is a thin shell over `evaluate_run(...)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import NonlocalExit
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from .checkpoint import PRETRAINED, CheckpointError, load, run_directory, write_atomically
from .config import default_device
from .data import DataError
from .datasets import load_data
from .model import MEMORY_FORMAT
from .trained import TrainedVAE

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): a unit is active when Cov_x(E_q[z_d | x]) exceeds this


def _log_prob(trace) -> torch.Tensor:
    """Sum of the log-probs of a trace's sample sites, one value per (sample, image).

    Unscaled: neither the minibatch factor N / B nor a KL weight enters a reported figure.
    """
    return sum(site["unscaled_log_prob"] for site in _with_log_probs(trace).nodes.values()
               if site["type"] == "sample" and not site_is_subsample(site))


def _with_log_probs(trace):
    """The trace, its sample sites' log-probs computed (a plate's subsample site has none: a constant 0)."""
    trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
    return trace


def _likelihood_log_prob(trace) -> torch.Tensor:
    """log p(x | z): the unscaled log-prob of the observed site "x" of a model trace whose log-probs are computed."""
    return trace.nodes["x"]["unscaled_log_prob"]


def _latent_log_ratios(model_trace, guide_trace) -> dict[str, torch.Tensor]:
    """log q(z_l | ...) - log p(z_l | ...) at the drawn values, per latent site (z, z2, ... in a hierarchy).

    Their sum's mean over z ~ q is KL(q(z | x) || p(z)); for the label-conditioned model KL(q(z | x, y) || p(z | y)),
    leaving out the label's own terms log p(y) (and, where y is inferred, log q(y | x)). The traces' log-probs
    are computed.
    """
    return {name: guide_trace.nodes[name]["unscaled_log_prob"] - model_trace.nodes[name]["unscaled_log_prob"]
            for name in _latent_sites(guide_trace)}


def _latent_sites(guide_trace) -> list[str]:
    """The latent sites a guide trace drew (z, z2, ...): its sample sites but plates' and the label's."""
    return [name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site) and name != "y"]


class _LeaveAfter(Messenger):
    """Leaves the program it wraps (a NonlocalExit) once each of `names` has been drawn: what comes after them,
    the decoder and the likelihood, does not run. A trace outside it has recorded those sites by then."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.left = set(names)

    def _postprocess_message(self, msg) -> None:
        self.left.discard(msg["name"])
        if not self.left:
            raise NonlocalExit(msg)


def _traces(model_guide, x: torch.Tensor, y: torch.Tensor | None, num_samples: int, latents_only: bool = False):
    """Guide trace and the model trace replayed on it, num_samples draws of z vectorized in a plate at dim -2.
    With `latents_only` the model is left once it has drawn the guide's latent sites: its trace ends there, and
    the decoder does not run."""
    with pyro.plate("samples", num_samples, dim=-2, device=x.device):
        guide_trace = poutine.trace(model_guide.guide).get_trace(x, y)
        model = model_guide.model
        if latents_only:
            model = _LeaveAfter(_latent_sites(guide_trace))(model)
        model = poutine.trace(poutine.replay(model, trace=guide_trace))
        try:
            model(x, y)
        except NonlocalExit:
            pass
    return model.msngr.get_trace(), guide_trace


@torch.no_grad()
def log_weights(vae, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 1) -> torch.Tensor:
    """log p(x, z) - log q(z | x) for num_samples draws z ~ q(z | x), vectorized: shape (num_samples, B)."""
    model_trace, guide_trace = _traces(vae, x, y, num_samples)
    return (_log_prob(model_trace) - _log_prob(guide_trace)).reshape(num_samples, -1)


@torch.no_grad()
def elbo_per_image(vae, images: torch.Tensor, labels: torch.Tensor | None = None,
                   batch_size: int = 1000) -> torch.Tensor:
    """Single-sample ELBO of each image in nats, shape (N,); the figure the training log reports."""
    return elbo_and_kl_per_image(vae, images, labels, batch_size)[0]


@torch.no_grad()
def elbo_and_kl_per_image(vae, images: torch.Tensor, labels: torch.Tensor | None = None,
                          batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-sample ELBO of each image and its KL term (log q(z | x) - log p(z) at the same z), in nats, each (N,)."""
    elbos, kls = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        y = None if labels is None else labels[start:start + batch_size]
        model_trace, guide_trace = _traces(vae, x, y, 1)
        elbos.append((_log_prob(model_trace) - _log_prob(guide_trace)).reshape(-1))
        kls.append(sum(_latent_log_ratios(model_trace, guide_trace).values()).reshape(-1))  # log-probs computed above
    return torch.cat(elbos), torch.cat(kls)


@torch.no_grad()
def kl_per_image(vae, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The KL term of each image, log q(z | x) - log p(z) at one draw z ~ q, shape (B,): the same draw and figure
    as `elbo_and_kl_per_image`'s, but the model is left once its latent sites are drawn, so the decoder (most of
    the cost with a PixelCNN likelihood) does not run. Free bits decide each training step on it."""
    model_trace, guide_trace = (_with_log_probs(t) for t in _traces(vae, x, y, 1, latents_only=True))
    return sum(_latent_log_ratios(model_trace, guide_trace).values()).reshape(-1)


class Estimates(NamedTuple):
    """Per-image estimates in nats, each (B,); per latent site, its KL term (B,) and posterior mean (B, width)."""

    log_px: torch.Tensor  # log (1/K) sum_k w_k: the importance-sampled log p(x), a lower bound that tightens with K
    elbo: torch.Tensor  # (1/K) sum_k log w_k: the ELBO, averaged over the same K draws
    reconstruction: torch.Tensor  # (1/K) sum_k log p(x | z_k): the reconstruction term of the ELBO
    kl: torch.Tensor  # (1/K) sum_k log q(z_k | x) - log p(z_k): the KL term of the ELBO, from the z sites alone
    layer_kl: dict  # site -> (1/K) sum_k of its log q - log p: the KL term of each layer; they sum to kl
    layer_mean: dict  # site -> E_q[z_l | x] over the same draws: the guide's conditional mean where it has one


@torch.no_grad()
def importance_estimates(model_guide, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 1000,
                         chunk: int = 100) -> Estimates:
    """log p(x), ELBO, reconstruction and KL term of each image from num_samples draws of z ~ q(z | x).

    model_guide is anything with `.model(x, y)` and `.guide(x, y)` whose data plate is at dim -1; the draws
    are made `chunk` at a time and combined with a running logsumexp, so memory does not grow with K.
    """
    running, sums = None, {}
    for start in range(0, num_samples, chunk):
        n = min(chunk, num_samples - start)
        model_trace, guide_trace = _traces(model_guide, x, y, n)
        log_w = (_log_prob(model_trace) - _log_prob(guide_trace)).reshape(n, -1)  # (n, B)
        ratios = _latent_log_ratios(model_trace, guide_trace)  # site log-probs computed by _log_prob above
        terms = {"elbo": log_w, "reconstruction": _likelihood_log_prob(model_trace), **ratios}
        chunk_sums = {name: t.expand_as(log_w).sum(0) for name, t in terms.items()}  # (B,) each
        for name in ratios:  # the guide's mean of each layer given the draws of the layers it depends on
            q = guide_trace.nodes[name]
            try:
                mean = q["fn"].mean
            except NotImplementedError:  # a flow (the iaf guide on z_1) has no closed-form mean: average the draws
                mean = q["value"]
            chunk_sums[f"mean {name}"] = mean.expand_as(q["value"]).reshape(n, x.shape[0], -1).sum(0)
        chunk_lse = log_w.logsumexp(0)
        running = chunk_lse if running is None else torch.logaddexp(running, chunk_lse)
        sums = chunk_sums if not sums else {name: sums[name] + value for name, value in chunk_sums.items()}
    means = {name: total / num_samples for name, total in sums.items()}
    layer_kl = {name: means[name] for name in ratios}
    return Estimates(running - math.log(num_samples), means["elbo"], means["reconstruction"],
                     sum(layer_kl.values()), layer_kl, {name: means[f"mean {name}"] for name in ratios})


@torch.no_grad()
def log_joint(model_guide, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x, z) of each image at each of G latent points z (G, B, latent_dim): shape (G, B).

    For models whose only latent site is "z" (with a label y, the label-conditioned model given y).
    """
    with pyro.plate("samples", z.shape[0], dim=-2, device=x.device):
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


# How many images x draws go through one forward pass. On the CPU the cost per draw of the default conv VAE is flat
# from about 50 to 200 images x draws per pass and doubles from 400 on (docs/evaluation.md): there its largest
# activation (32 channels of 28 x 28 per draw, 100 KB) passes 32 MiB, the largest size glibc's malloc serves from
# its heap, so every pass maps that memory from the kernel anew and the kernel zeroes it (system time). So on the CPU
# a pass's largest activation is kept to half of that, 16 MiB (167 draws of that VAE, 5,350 of the MLP). On CUDA a
# pass may take a quarter of the free memory: the caching allocator keeps it, and larger passes keep the GPU busy.
CPU_LARGEST_ACTIVATION = 16 * 2 ** 20  # bytes
CUDA_FREE_FRACTION = 0.25
MEMORY_FRACTION = 0.5  # the most of the available memory one pass may hold: a larger size asked for is clamped
PARTIAL_FORMAT = "pyro_vae.evaluate.partial/1"


class Sizing(NamedTuple):
    """Images per batch and draws of z per forward pass; note: the line that says why a request was cut down."""

    batch_size: int
    chunk: int
    note: str | None = None


def activation_bytes(vae, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[int, int]:
    """Bytes that one draw of z for one image puts through the networks: all their layers' outputs, and the largest."""
    sizes = []

    def record(module, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        sizes.append(sum(t.numel() * t.element_size() for t in outputs if torch.is_tensor(t)))

    hooks = [m.register_forward_hook(record) for m in vae.modules() if not any(m.children())]
    try:
        _traces(vae, x[:1], None if y is None else y[:1], 1)
    finally:
        for hook in hooks:
            hook.remove()
    return max(sum(sizes), 1), max(max(sizes, default=1), 1)


def available_memory(device: torch.device) -> int:
    """Bytes free for activations: the CUDA device's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: the physical memory
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def busy_cores(window: float = 0.2) -> float | None:
    """How many of this process's cores (its affinity mask) other processes keep busy now: their non-idle share of
    the CPU time in /proc/stat over a short window. None where /proc/stat cannot be read."""
    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *ticks = line.split()
                if name in mine:
                    ticks = [int(v) for v in ticks]
                    total, idle = total + sum(ticks), idle + ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return total, idle  # idle counts iowait too
    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return len(mine) * (1 - (idle1 - idle0) / (total1 - total0))


def cpu_threads() -> int:
    """Torch threads for evaluating on the CPU: one per idle core, at least one and at most torch's own setting. Busy
    cores are measured now (busy_cores), not by the 1-minute load average, which still counts a training that has just
    ended in the same process (experiments/run.py) or the previous run of a benchmark; the load average only where
    /proc/stat is missing.

    Where other jobs keep the cores busy, threads beyond the idle cores spin-wait for each other at every layer of a
    small pass: measured on this project's loaded 2-core CPU, two threads took about 5 times the CPU time and the
    wall time of one (docs/evaluation.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
        busy = busy_cores()
        idle = cores - (busy if busy is not None else os.getloadavg()[0])
    except (AttributeError, OSError):  # no affinity mask or load average here
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), round(idle)))


def pass_sizing(vae, x: torch.Tensor, y: torch.Tensor | None = None, *, k: int, device: torch.device,
                batch_size: int | None = None, chunk: int | None = None) -> Sizing:
    """Images per batch and draws per forward pass for images x: those asked for, the rest from the device's budget.

    The budget (images x draws per pass) is CPU_LARGEST_ACTIVATION on the CPU, a CUDA_FREE_FRACTION of the free
    memory on CUDA; either way at most MEMORY_FRACTION of the available memory, to which a size asked for is clamped.
    """
    per_draw, largest = activation_bytes(vae, x, y)
    available = available_memory(device)
    fits = max(1, int(MEMORY_FRACTION * available) // per_draw)
    budget = int(CUDA_FREE_FRACTION * available) // per_draw if device.type == "cuda" else \
        CPU_LARGEST_ACTIVATION // largest
    budget = max(1, min(budget, fits))
    if chunk is None:  # as many draws as the budget leaves, K split into passes of equal size
        per_pass = max(1, min(k, budget // (batch_size or 1)))
        chunk = math.ceil(k / math.ceil(k / per_pass))
    chunk = min(chunk, k)
    batch_size = max(1, min(batch_size or budget // chunk, len(x)))
    if batch_size * chunk <= fits:
        return Sizing(batch_size, chunk)
    new_batch = min(batch_size, fits)
    new_chunk = max(1, fits // new_batch)
    note = (f"--batch-size {batch_size} x --chunk {chunk} would hold about "
            f"{batch_size * chunk * per_draw / 2 ** 30:.1f} "
            f"GiB of activations, more than {MEMORY_FRACTION:.0%} of the {available / 2 ** 30:.1f} GiB available on "
            f"{device.type}; using --batch-size {new_batch} --chunk {new_chunk}")
    return Sizing(new_batch, new_chunk, note)


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index`: its draws depend on (seed, index) and the sizing alone, not on what ran before."""
    return int.from_bytes(hashlib.sha256(f"pyro_vae.evaluate {seed} {index}".encode()).digest()[:8], "little")


def run_identity(run: TrainedVAE) -> str:
    """A digest of the run's weights and of the config fields that shape its model and test set."""
    digest = hashlib.sha256()
    config = {key: value for key, value in run.config.to_dict().items() if key not in ("device", "out", "data_dir")}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in run.vae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def partial_path(out: str | Path) -> Path:
    """Where an evaluation that writes `out` keeps its finished batches: evaluation.json -> evaluation.partial.json."""
    out = Path(out)
    return out.with_name(f"{out.stem}.partial.json")


def _write_atomic(path: Path, text: str) -> None:
    """Write text to path whole or not at all (checkpoint.write_atomically), making its folder if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda f: f.write(text.encode()))


def _save_partial(path: Path, state: dict) -> None:
    """The settings, progress and running totals as JSON: floats round-trip exactly, and the file stays small."""
    totals = {name: value.tolist() for name, value in state["totals"].items()}
    _write_atomic(path, json.dumps({**state, "totals": totals}) + "\n")


def _read_partial(path: Path, settings: dict, automatic: set) -> tuple[dict | None, str]:
    """The state saved in path if it was made with these settings, and the line to say about it.

    The settings in `automatic` (sizes and threads nobody asked for) take the file's values.
    """
    if not path.exists():
        return None, ""
    try:
        state = json.loads(path.read_text())
        saved = state["settings"]
        if saved.get("format") != PARTIAL_FORMAT:
            raise ValueError(f"not a {PARTIAL_FORMAT} file")
        state["totals"] = {name: torch.tensor(value, dtype=torch.float64) for name, value in state["totals"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # cut short, or not ours
        return None, f"{path} is not readable ({e}); starting over"
    differ = [key for key in settings if key not in automatic and saved.get(key) != settings[key]]
    if differ:
        change = ", ".join(f"{key} {saved.get(key)}, now {settings[key]}" for key in differ)
        return None, f"{path} was made with other settings ({change}); starting over"
    return state, f"resuming from {path}: {state['images']} of {settings['num_images']} images done"


def _add(totals: dict, figures: dict) -> None:
    """Add each figure's sum over images and sum of squares (float64, on the CPU) to the running totals."""
    for name, values in figures.items():
        values = values.detach().double().cpu()
        for key, value in ((name, values.sum(0)), (f"{name}^2", (values * values).sum(0))):
            totals[key] = totals[key] + value if key in totals else value


def _mean_variance(totals: dict, name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sample variance over n images of a figure in the totals."""
    total = totals[name]
    if n < 2:
        return total / n, torch.zeros_like(total)
    return total / n, ((totals[f"{name}^2"] - total * total / n) / (n - 1)).clamp(min=0)


def _summary(totals: dict, name: str, n: int) -> dict:
    """Mean over n images of a figure in the totals, and its standard error."""
    mean, variance = _mean_variance(totals, name, n)
    return {"mean": mean.item(), "stderr": math.sqrt(variance.item() / n) if n > 1 else float("nan")}


def _resume(partial: Path, settings: dict, automatic: set, fits) -> tuple[dict | None, dict]:
    """The state saved in partial if it continues this evaluation, and the settings to go on with; says which.

    Settings in `automatic` (nobody asked for them) take the file's values if its sizes fit(batch_size, chunk).
    """
    state, message = _read_partial(partial, settings, automatic)
    if state and not fits(state["settings"]["batch_size"], state["settings"]["chunk"]):
        state, message = None, f"{partial}: its batches of {state['settings']['batch_size']} images x " \
                               f"{state['settings']['chunk']} draws do not fit this device's memory; starting over"
    if message:
        print(f"pyro_vae.evaluate: {message}", file=sys.stderr)
    return state, state["settings"] if state else settings


@torch.no_grad()
def batch_figures(run, x: torch.Tensor, y: torch.Tensor | None, *, k: int, chunk: int) -> dict[str, torch.Tensor]:
    """Every per-image figure that evaluate_run sums, for one batch of images x: k draws each, chunk per pass."""
    e = importance_estimates(run.vae, x, y, num_samples=k, chunk=chunk)
    loc, scale = posterior_params(run, x, y)  # (B, latent_dim) each
    # ELBO = reconstruction - KL + the label's terms: log p(y) where y is observed (log 1/10),
    # E_q[log p(y) - log q(y | x)] = -KL(q(y | x) || p(y)) where q(y | x) infers it, nothing without a label
    return {"log_px": e.log_px, "elbo": e.elbo, "reconstruction": e.reconstruction, "kl": e.kl,
            "label": e.elbo - e.reconstruction + e.kl, "gap": e.log_px - e.elbo, "loc": loc,
            "kl_per_dim": kl_to_standard_normal(loc, scale),
            **{f"kl {site}": value for site, value in e.layer_kl.items()},
            **{f"mean {site}": value for site, value in e.layer_mean.items()}}


def _layout_name(device: torch.device) -> str:
    """The layout the convolutions run in on device (model.MEMORY_FORMAT), as the partial file records it."""
    return "channels_last" if MEMORY_FORMAT.get(device.type) == torch.channels_last else "contiguous"


def evaluate_run(run, *, k: int = 1000, limit: int = 0, batch_size: int | None = None, chunk: int | None = None,
                 threads: int | None = None, seed: int = 0, device: str | None = None, data_dir: str | None = None,
                 progress: bool | None = None, partial: str | Path | None = None) -> dict:
    """Evaluate a run (a path, or a run from `pyro_vae.load`) on its own test set; return the figures.

    `limit` keeps the first N test images (0: all); each image gets k draws from q(z | x), `chunk` at a time for
    `batch_size` images; either left None is sized from the device's memory (`pass_sizing`), and on the CPU
    `threads` None is one torch thread per idle core (`cpu_threads`). With `partial`, the totals are saved there
    after each batch, and an evaluation with the same settings found there is continued; the file is left for the
    caller to remove. Batch i's draws depend only on (seed, i) and the sizing.
    """
    started = time.perf_counter()
    path = None
    if not isinstance(run, TrainedVAE):
        path, run = str(run), load(run, device=device or default_device())
    config, device = run.config, run.device
    # the test split exactly as training reported it; the training images are not read
    data = load_data(config, device=device, split="test", data_dir=data_dir)
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    labels_observed = getattr(run, "labels_observed", False)  # the label-conditioned model is told y
    batch_labels = (lambda start, end: labels[start:end]) if labels_observed else (lambda start, end: None)
    previous_threads = torch.get_num_threads()

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        def sizing(b=batch_size, c=chunk) -> Sizing:
            return pass_sizing(run.vae, images, batch_labels(0, 1), k=k, device=device, batch_size=b, chunk=c)

        chosen = sizing()
        if chosen.note:
            print(f"pyro_vae.evaluate: {chosen.note}", file=sys.stderr)
        settings = {"format": PARTIAL_FORMAT, "run": run_identity(run), "device": device.type, "k": k, "seed": seed,
                    "num_images": len(images), "batch_size": chosen.batch_size, "chunk": chosen.chunk,
                    "threads": None if device.type == "cuda" else threads or cpu_threads(),
                    "memory_format": _layout_name(device)}
        state = None
        if partial is not None:
            partial = Path(partial)
            automatic = {name for name, asked in (("batch_size", batch_size), ("chunk", chunk), ("threads", threads))
                         if asked is None}
            state, settings = _resume(partial, settings, automatic, lambda b, c: sizing(b, c).note is None)
        b, chunk = settings["batch_size"], settings["chunk"]
        totals, done = (state["totals"], state["batches"]) if state else ({}, 0)
        before = state["seconds"] if state else 0.0
        bar = tqdm(total=len(images), initial=min(done * b, len(images)), desc=f"log p(x), K={k}", unit="img",
                   disable=None if progress is None else not progress)
        try:
            if settings["threads"]:
                torch.set_num_threads(settings["threads"])
            for index in range(done, math.ceil(len(images) / b)):
                x, y = images[index * b:(index + 1) * b], batch_labels(index * b, (index + 1) * b)
                torch.manual_seed(batch_seed(seed, index))
                _add(totals, batch_figures(run, x, y, k=k, chunk=chunk))
                if partial is not None:
                    _save_partial(partial, {"settings": settings, "batches": index + 1, "totals": totals,
                                            "images": min((index + 1) * b, len(images)),
                                            "seconds": before + time.perf_counter() - started})
                bar.update(len(x))
        finally:
            torch.set_num_threads(previous_threads)
            bar.close()

    n = len(images)
    if not config.conditional:
        label = {}
    elif labels_observed:
        label = {"log_py": _summary(totals, "label", n)}
    else:
        kl_y = _summary(totals, "label", n)
        label = {"kl_y": {**kl_y, "mean": -kl_y["mean"]}}
    mean_variance = _mean_variance(totals, "loc", n)[1]
    layers = [{"site": site, "width": len(totals[f"mean {site}"]), "kl": _summary(totals, f"kl {site}", n),
               "active_units": int((_mean_variance(totals, f"mean {site}", n)[1] > ACTIVE_UNIT_THRESHOLD).sum())}
              for site in run.vae.sites] if len(run.vae.sites) > 1 else []
    return {
        "run": path or config.out, "epoch": run.epoch,
        "k": k, "num_images": n, "num_test_images": len(data.test_images),
        "seed": seed, "device": str(device), "batch_size": b, "chunk": chunk, "threads": settings["threads"],
        "resumed_images": state["images"] if state else 0,
        "latent_dim": config.latent_dim, "binarize": config.binarize, "conditional": config.conditional,
        "labels_observed": labels_observed,
        "prior": config.prior, "likelihood": config.likelihood, "guide": config.guide,
        "elbo": _summary(totals, "elbo", n),
        "log_px": _summary(totals, "log_px", n),
        "reconstruction": _summary(totals, "reconstruction", n),  # E_q[log p(x | z)] (conditional: log p(x | z, y))
        "kl": _summary(totals, "kl", n),  # KL(q(z | x) || p(z)) for whatever prior; conditional: KL(q(z|x,y) || p(z|y))
        **label,
        "gap": _summary(totals, "gap", n),  # how far the K-sample bound rises above the ELBO
        "dimensions": math.prod(config.shape()),  # of an image: what bits per dimension divide by
        "kl_per_dim_to_standard_normal": (totals["kl_per_dim"] / n).tolist(),
        "posterior_mean_variance": mean_variance.tolist(),
        "active_units": int((mean_variance > ACTIVE_UNIT_THRESHOLD).sum()),
        "active_unit_threshold": ACTIVE_UNIT_THRESHOLD,
        "seconds": before + time.perf_counter() - started,
        **({"layers": layers} if layers else {}),
    }


def format_table(results: dict) -> str:
    """The figures of `evaluate_run` as a plain-text table."""
    r = results
    used = f"{r['num_images']} of {r['num_test_images']} test images"
    lines = [
        f"pyro_vae.evaluate: {r['run']} (epoch {r['epoch']}; prior {r['prior']}, likelihood {r['likelihood']}, "
        f"guide {r['guide']})",
        f"  {used}, K = {r['k']} draws from q(z|x) per image, seed {r['seed']}, {r['device']}, "
        f"{r['seconds']:.1f} s ({r['batch_size']} images x {r['chunk']} draws per forward pass"
        + (f", {r['threads']} threads)" if r.get("threads") else ")"),
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
    if "dimensions" in r:  # -log2 p(x) per pixel channel: 8 is the uniform code of 8-bit pixels
        per_dim = r["dimensions"] * math.log(2)
        lines += ["", f"  {'bits per dimension (%d per image)' % r['dimensions']:42s} {'mean':>9s} {'std. err.':>9s}"]
        lines += [f"  {label:42s} {-r[key]['mean'] / per_dim:9.4f} {r[key]['stderr'] / per_dim:9.4f}"
                  for label, key in (("-ELBO", "elbo"), (f"-log p({joint}), K = {r['k']}", "log_px"))]
    if r["guide"] == "delta":
        lines.append("  note: q(z|x) is a point mass (--guide delta): these are log p(x, z*), not bounds on log p(x)")
    if r.get("layers"):  # a hierarchical VAE: the KL and active units of each layer; the table below is z's
        lines += ["", f"  {'per stochastic layer (z is z_1)':32s} {'KL nats':>9s} {'std. err.':>9s} "
                      f"{'active units':>14s}"]
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None: those flags say in words what happens without them."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(prog: str = "python -m pyro_vae.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a trained run on its test set: ELBO, importance-sampled log p(x), KL, active units. "
                    "Writes RUN/evaluation.json (for a shipped pretrained/NAME, runs/NAME/evaluation.json) and prints "
                    "a table. After each batch the totals so far are saved beside it (evaluation.partial.json): run "
                    "the same command again after a kill and it continues from there.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--k", type=int, default=1000, help="draws from q(z|x) per image for log p(x)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N test images (0: all)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass and per saved batch (default: sized from the device's "
                             "memory, with --chunk)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="draws of z per forward pass; memory grows with batch size x chunk (default: as many as "
                             "the device's budget allows, about 16 MiB of largest activation on the CPU and a "
                             "quarter of the free memory on CUDA; a size beyond half the available memory is clamped)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on the CPU (default: one per idle core, the cores less those busy now)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the draws of z")
    parser.add_argument("--device", default=default_device(), help="torch device (cuda when available, else cpu)")
    parser.add_argument("--data-dir", default=None, help="where MNIST is unpacked (default: the run's --data-dir)")
    parser.add_argument("--out", default=None,
                        help="JSON file to write (default: RUN/evaluation.json; runs/NAME/evaluation.json for "
                             "pretrained/NAME)")
    return parser


def default_out(run: str | Path) -> Path:
    """RUN/evaluation.json, or runs/NAME/evaluation.json for a shipped run: the repository's pretrained/ stays clean."""
    run_dir = run_directory(run)
    if run_dir.resolve().is_relative_to(PRETRAINED.resolve()):
        return Path("runs") / run_dir.name / "evaluation.json"
    return run_dir / "evaluation.json"


class Stopped(Exception):
    """SIGTERM arrived (SIGINT raises KeyboardInterrupt); the batches finished so far are saved."""


def _stop(signum, frame):
    raise Stopped(signum)


def main(argv=None, prog: str = "python -m pyro_vae.evaluate") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for flag, value, minimum in (("--k", args.k, 1), ("--chunk", args.chunk, 1),
                                 ("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1),
                                 ("--limit", args.limit, 0)):
        if value is not None and value < minimum:
            parser.error(f"{flag} must be at least {minimum}, not {value}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], not {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for, but this machine has no CUDA device; use --device cpu")
    out = Path(args.out) if args.out else default_out(args.run)
    partial = partial_path(out)
    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() else None
    try:
        results = evaluate_run(args.run, k=args.k, limit=args.limit, batch_size=args.batch_size, chunk=args.chunk,
                               threads=args.threads, seed=args.seed, device=args.device, data_dir=args.data_dir,
                               partial=partial)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stopped) as e:
        signum = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
        saved = f"the finished batches are in {partial}" if partial.exists() else "no batch had finished"
        print(f"\npyro_vae.evaluate: {signal.Signals(signum).name}: stopped; {saved}; run the same command "
              "again to continue", file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    _write_atomic(out, json.dumps(results, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(format_table(results))
    print(f"pyro_vae: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
