"""How fast the project trains and evaluates, against a hand-written PyTorch yardstick (issue 6).

`uv run python benchmarks/bench.py` (or `uv run python -m benchmarks.bench`) times the trainer's
own training step (the VAE from `build_vae`, stepped by `pyro_vae.train.SVIStep` as the training
loop steps it) and that of a yardstick: the same networks with the same single-sample ELBO written
in plain PyTorch and one `torch.optim.Adam`. On CUDA each side also runs captured as a CUDA graph
(`project-graph`: the trainer's own captured step; `yardstick-graph`: the hand-written step captured
by hand), every ratio against the eager yardstick. The sides run in interleaved blocks (A B A B ...)
after a warm-up, so a burst of load from another process hits both alike; the figure of merit is
the median over the pairs of (project block time / yardstick block time). Evaluation
(`elbo_per_image`, and the K-sample log-likelihood that `pyro_vae.evaluate` offers) and peak
memory are reported too.

The yardstick's loss below is the only hand-written ELBO in the project, on purpose: it is the
measuring stick, not a model, so it lives here, outside the package. tests/test_bench.py checks
that it computes the same objective.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import date
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from torch.nn import functional as F

from pyro_vae import evaluate
from pyro_vae.config import Config
from pyro_vae.data import IMAGE_SHAPE, MNIST, MNIST_TEST, MNIST_TRAIN, NUM_CLASSES, load_mnist
from pyro_vae.model import build_vae
from pyro_vae.nets import make_nets
from pyro_vae.precision import autocast
from pyro_vae.train import SVIStep, free_bits_weight, make_elbo

LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------------
# The yardstick: the same networks and the same single-sample ELBO, by hand


def yardstick_elbo(encoder, decoder, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Single-sample ELBO of each image x (B, 1, 28, 28), shape (B,): log p(x | z) + log p(z) - log q(z | x).

    The KL part is sampled (log q - log p at the same z), the estimator Trace_ELBO uses; eps is drawn
    with the call Normal.rsample makes, so under the same seed both sides draw the same z.
    """
    loc, scale = (t.float() for t in encoder(x))  # (B, D) each; fp32 under bf16 autocast, as the project's boundary
    if eps is None:
        eps = torch.empty_like(loc).normal_()
    z = loc + eps * scale  # reparameterized
    log_lik = -F.binary_cross_entropy_with_logits(decoder(z).float(), x, reduction="none").sum((-3, -2, -1))
    log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)  # Normal(loc, scale)
    log_p = (-0.5 * z ** 2 - 0.5 * LOG_2PI).sum(-1)  # Normal(0, I)
    return log_lik + log_p - log_q


def yardstick_loss(encoder, decoder, x: torch.Tensor, num_data: int, eps: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """-ELBO of a minibatch scaled by num_data / B, as the model's subsampled `data` plate scales it."""
    return -yardstick_elbo(encoder, decoder, x, eps).sum() * (num_data / x.shape[0])


class Yardstick:
    """A plain PyTorch training step: nets from make_nets, the loss above, one Adam over all parameters.

    capture (CUDA only): after WARMUP_STEPS eager steps on a side stream, the step is captured as a CUDA graph
    by hand, as torch's documentation does it (static batch, Adam with capturable=True), and replayed.
    precision bf16: the loss under the same autocast as the trainer's step (pyro_vae.precision.autocast), the
    networks' outputs cast to fp32 before the log-probs as the project casts them.
    """

    WARMUP_STEPS = 3

    def __init__(self, config: Config, num_data: int, device: torch.device, capture: bool = False):
        self.encoder, self.decoder = (net.to(device) for net in make_nets(config))
        self.num_data, self.precision, self.device = num_data, config.precision, device
        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=config.lr, capturable=capture)
        self.stream = torch.cuda.Stream(device) if capture else None
        self.graph, self.eager_steps = None, 0

    def scope(self) -> AbstractContextManager:
        return nullcontext()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        # No .item(): a hand-written loop need not wait for the loss; SVI.step's float is part of what is measured.
        if self.stream is not None and self.graph is None and self.eager_steps >= self.WARMUP_STEPS:
            self._capture(x)
        if self.graph is not None:
            self.static_x.copy_(x)
            self.graph.replay()
            return self.static_loss.clone()
        self.eager_steps += 1
        if self.stream is None:
            return self._eager_step(x)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            loss = self._eager_step(x)
        torch.cuda.current_stream().wait_stream(self.stream)
        loss.record_stream(torch.cuda.current_stream())
        return loss

    def _eager_step(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            loss = yardstick_loss(self.encoder, self.decoder, x, self.num_data)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with warnings.catch_warnings():  # torch warns that a capturable Adam steps uncaptured: the warm-up does
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            self.optimizer.step()
        return loss.detach()

    def _capture(self, x: torch.Tensor) -> None:
        self.static_x = x.clone()
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's memory
        with torch.cuda.graph(self.graph, stream=self.stream):
            with autocast(self.precision, self.device, cache_enabled=False):
                loss = yardstick_loss(self.encoder, self.decoder, self.static_x, self.num_data)
            loss.backward()
            self.optimizer.step()
        self.static_loss = loss.detach()


# ---------------------------------------------------------------------------------------------------
# The project side: the trainer's step


class ProjectTrainer:
    """The training step of pyro_vae.train: the VAE from build_vae, stepped by SVIStep as the loop steps it."""

    def __init__(self, config: Config, num_data: int, device: torch.device):
        self.vae = build_vae(config, num_data=num_data).to(device)  # config.cuda_graph: captured on CUDA or not
        # Pyro keeps parameters in one global store, by name; each side has its own (entered by scope()),
        # which also stands for the loop's pyro.clear_param_store().
        self._store = {"params": {}, "constraints": {}}
        self.svi = SVIStep(self.vae, config)
        self.config, self.weight = config, self.vae.kl_weight

    def scope(self) -> AbstractContextManager:
        """This side's parameter store, swapped in around a block of steps."""
        return pyro.get_param_store().scope(self._store)

    def step(self, x: torch.Tensor) -> float:
        # the loop's own decision under --free-bits (its estimate is part of the step's cost); else the weight as is
        self.vae.kl_weight = free_bits_weight(self.vae, x, None, self.weight, self.config)
        return self.svi.step(x, None)  # unlabelled, as the loop's batches of this model are


class StockSVI(ProjectTrainer):
    """For comparison, not the trainer: Pyro's stock `SVI` with `pyro.optim.Adam`, validation on every step.

    What the trainer ran before SVIStep: one Pyro optimizer per parameter, a parameter-capturing trace
    and fresh zero gradients every step, and Pyro's checks on each step (Pyro's default).
    """

    def __init__(self, config: Config, num_data: int, device: torch.device):
        super().__init__(config, num_data, device)
        self.svi = SVI(self.vae.model, self.vae.guide, pyro.optim.Adam({"lr": config.lr}), loss=make_elbo(config))

    def step(self, x: torch.Tensor) -> float:
        with pyro.validation_enabled(True):
            return self.svi.step(x, None)


# ---------------------------------------------------------------------------------------------------
# Data, timing, memory


def synthetic_mnist(num_train: int, num_test: int, device: torch.device, seed: int = 0) -> MNIST:
    """Random grey images in MNIST's shapes, binarized dynamically like the real set: for quick checks."""
    generator = torch.Generator().manual_seed(seed)
    train = torch.rand(num_train, *IMAGE_SHAPE, generator=generator)
    test = torch.bernoulli(torch.rand(num_test, *IMAGE_SHAPE, generator=generator), generator=generator)
    train_y, test_y = (torch.randint(0, NUM_CLASSES, (n,), generator=generator) for n in (num_train, num_test))
    return MNIST(train.to(device), train_y.to(device), test.to(device), test_y.to(device), "dynamic")


def batch_drawer(data: MNIST, batch_size: int) -> Callable[[], torch.Tensor]:
    """Random minibatches drawn as the trainer draws them: indices -> images -> MNIST.batch's Bernoulli draw."""
    device = data.train_images.device

    def draw() -> torch.Tensor:
        indices = torch.randint(0, data.num_train, (batch_size,), device=device)
        return data.batch(indices, labelled=False)[0]  # (B, 1, 28, 28)

    return draw


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock reads the time the work took rather than the time to queue it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(side, draw: Callable, steps: int, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for `steps` training steps of a side, each on a fresh batch.

    Drawing the batch is part of a step, as in the trainer. Many steps per reading keep the timer's and
    the scheduler's noise small against the block. CPU time is a cross-check on a shared machine: another
    process's load stretches wall time but hardly the CPU time this one needs (with one thread).
    """
    with side.scope():
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            side.step(draw())
        synchronize(device)
        return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_times(sides: dict, draw: Callable, steps: int, repeats: int, warmup: int,
                      device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU block times of each side, taken in turn (A B A B ...) after `warmup` unkept blocks each."""
    for _ in range(warmup):  # first calls allocate and pick kernels; the trainer's first step runs Pyro's checks
        for side in sides.values():
            time_block(side, draw, steps, device)
    times = {name: {"wall": [], "cpu": []} for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            wall, cpu = time_block(side, draw, steps, device)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_cuda_bytes(side, draw: Callable, device: torch.device, steps: int = 3) -> int:
    """Peak GPU memory allocated while one side takes a few steps on its own (after its warm-up)."""
    with side.scope():
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            side.step(draw())
        synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


# ---------------------------------------------------------------------------------------------------
# The benchmarks


def bench_config(args: argparse.Namespace, batch_size: int) -> Config:
    """The Config the trainer would get for these settings (everything else at its default), its step eager."""
    return Config(batch_size=batch_size, latent_dim=args.latent_dim, arch=args.arch,
                  conv_channels=tuple(args.conv_channels), hidden_dim=args.hidden_dim, lr=args.lr,
                  seed=args.seed, device=args.device, data_dir=args.data_dir, cuda_graph=False)


def build_sides(config: Config, num_data: int, args: argparse.Namespace) -> dict:
    """The trainer's step and the yardstick, eager and (on CUDA) captured, plus stock SVI if asked for; equal
    initial weights."""
    device = torch.device(config.device)
    makers = {"project": lambda: ProjectTrainer(config, num_data, device),
              "yardstick": lambda: Yardstick(config, num_data, device)}
    if device.type == "cuda" and not args.no_cuda_graph:
        makers["project-graph"] = lambda: ProjectTrainer(dataclasses.replace(config, cuda_graph=True), num_data,
                                                          device)
        makers["yardstick-graph"] = lambda: Yardstick(config, num_data, device, capture=True)
    if args.stock_svi:
        makers["stock-svi"] = lambda: StockSVI(config, num_data, device)
    if args.bf16:  # both steps again under bf16 autocast: the trainer's (--precision bf16) and the yardstick's
        bf16 = dataclasses.replace(config, precision="bf16")
        makers["project-bf16"] = lambda: ProjectTrainer(bf16, num_data, device)
        makers["yardstick-bf16"] = lambda: Yardstick(bf16, num_data, device)
        if "project-graph" in makers:  # bf16 inside the captured step (issue 40, item 4)
            makers["project-graph-bf16"] = lambda: ProjectTrainer(dataclasses.replace(bf16, cuda_graph=True),
                                                                   num_data, device)
    sides = {}
    for name, make in makers.items():
        torch.manual_seed(config.seed)  # make_nets draws the same initial weights for every side
        sides[name] = make()
    return sides


def bench_training(config: Config, data: MNIST, args: argparse.Namespace) -> dict:
    """Interleaved timing of the trainer's step and the yardstick's step at config.batch_size."""
    device = torch.device(config.device)
    sides = build_sides(config, data.num_train, args)
    draw = batch_drawer(data, config.batch_size)
    times = interleaved_times(sides, draw, args.steps, args.repeats, args.warmup, device)
    images = args.steps * config.batch_size
    result = {"batch_size": config.batch_size, "sides": {}}
    yardstick = times["yardstick"]
    for name, t in times.items():
        median = statistics.median(t["wall"])
        entry = {"images_per_s": images / median, "ms_per_step": 1000 * median / args.steps,
                 "block_s": t["wall"], "block_cpu_s": t["cpu"]}
        if name != "yardstick":
            ratios = [a / b for a, b in zip(t["wall"], yardstick["wall"])]  # blocks taken back to back
            cpu_ratios = [a / b for a, b in zip(t["cpu"], yardstick["cpu"])]
            entry.update(ratio_to_yardstick=statistics.median(ratios), ratio_quartiles=quartiles(ratios),
                         ratios=ratios, cpu_ratio_to_yardstick=statistics.median(cpu_ratios))
        result["sides"][name] = entry
    result["ratio"] = result["sides"]["project"]["ratio_to_yardstick"]
    if "project-bf16" in times:  # issue 40's bars: bf16 trainer against fp32 trainer and against bf16 yardstick
        result["bf16"] = {f"{a}/{b}": statistics.median(x / y for x, y in zip(times[a]["wall"], times[b]["wall"]))
                          for a, b in BF16_PAIRS if a in times and b in times}
    if device.type == "cuda":
        result["peak_memory_bytes"] = {name: peak_cuda_bytes(side, draw, device) for name, side in sides.items()}
    else:
        result["peak_rss_bytes"] = peak_rss_bytes()  # the whole process so far: the CPU cannot split it by side
    return result


def _timed(fn: Callable, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_evaluation(config: Config, data: MNIST, args: argparse.Namespace) -> dict:
    """Time the test-set ELBO the trainer reports each epoch (against the yardstick's), and K-sample log p(x)."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    vae = build_vae(config, num_data=data.num_train).to(device).eval()
    images = data.test_images  # (N, 1, 28, 28), binarized once as the test figures use them
    batches = images.split(config.eval_batch_size)

    def project():
        return evaluate.elbo_per_image(vae, images, batch_size=config.eval_batch_size)

    # the yardstick's networks as a user writes them (make_nets, torch's layout), with the project's weights
    encoder, decoder = (net.to(device).eval() for net in make_nets(config))
    encoder.load_state_dict(vae.encoder.state_dict())
    decoder.load_state_dict(vae.decoder.state_dict())

    @torch.no_grad()
    def yardstick():
        return torch.cat([yardstick_elbo(encoder, decoder, x) for x in batches])

    result = {"test_images": len(images), "eval_batch_size": config.eval_batch_size}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with pyro.get_param_store().scope():  # evaluation traces register the modules; keep them apart
        project(), yardstick()  # warm-up
        times = {"elbo_per_image": [], "yardstick": []}
        for _ in range(args.eval_repeats):
            times["elbo_per_image"].append(_timed(project, device))
            times["yardstick"].append(_timed(yardstick, device))
        for name, seconds in times.items():
            median = statistics.median(seconds)
            result[name] = {"seconds": median, "images_per_s": len(images) / median}
        result["ratio"] = statistics.median(a / b for a, b in zip(times["elbo_per_image"], times["yardstick"]))

        # evaluate.py is growing (evaluate_run); its per-batch K-sample estimator is what costs the time
        estimator = getattr(evaluate, "importance_estimates", None)
        if estimator is None or args.ll_images == 0:
            result["log_likelihood"] = None
        else:
            x = images[:args.ll_images]
            seconds = _timed(lambda: estimator(vae, x, num_samples=args.ll_k, chunk=args.ll_chunk), device)
            result["log_likelihood"] = {"function": "pyro_vae.evaluate.importance_estimates", "images": len(x),
                                        "k": args.ll_k, "chunk": args.ll_chunk, "seconds": seconds,
                                        "images_per_s": len(x) / seconds,
                                        "test_set_s": len(images) * seconds / len(x)}
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def load_data(args: argparse.Namespace) -> MNIST:
    """Real MNIST on the device, or random binary images of its size with --synthetic."""
    device = torch.device(args.device)
    if args.synthetic:
        return synthetic_mnist(args.train_size or MNIST_TRAIN, args.test_size or MNIST_TEST, device, args.seed)
    return load_mnist(args.data_dir, device=device, train_size=args.train_size, test_size=args.test_size)


def run(args: argparse.Namespace, progress: Callable[[dict], None] = lambda results: None) -> dict:
    """Every benchmark the arguments ask for, as one JSON-ready dict; progress(results) after each part, so
    a run stopped early keeps what it measured."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as the training loop: every batch has one shape
    pyro.set_rng_seed(args.seed)
    data = load_data(args)
    results = {
        "date": date.today().isoformat(), "command": "python benchmarks/bench.py " + " ".join(args.argv),
        "device": args.device, "device_name": _device_name(args.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
        "data": "synthetic" if args.synthetic else "mnist", "num_train": data.num_train,
        "arch": args.arch, "conv_channels": list(args.conv_channels), "hidden_dim": args.hidden_dim,
        "latent_dim": args.latent_dim, "steps_per_block": args.steps, "repeats": args.repeats,
        "warmup_blocks": args.warmup, "training": [], "evaluation": None,
    }
    for batch_size in args.batch_size:
        result = bench_training(bench_config(args, batch_size), data, args)
        results["training"].append(result)
        ratios = ", ".join(f"{name}/yardstick {side['ratio_to_yardstick']:.3f}"
                           for name, side in result["sides"].items() if "ratio_to_yardstick" in side)
        print(f"bench: batch {batch_size}: {ratios}", file=sys.stderr, flush=True)  # a full run takes minutes
        progress(results)
    if not args.no_eval:
        results["evaluation"] = bench_evaluation(bench_config(args, args.batch_size[0]), data, args)
        progress(results)
    return results


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------
# Output


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def format_training_row(result: dict) -> str:
    """The lines of one batch size: each side's speed and its ratio to the yardstick."""
    lines = []
    for name, side in result["sides"].items():
        if "ratio_to_yardstick" in side:
            q1, _, q3 = side["ratio_quartiles"]
            spread = f"{q1:.3f}-{q3:.3f}"
            ratio = f"{side['ratio_to_yardstick']:6.3f}  {spread:>11s}  {side['cpu_ratio_to_yardstick']:9.3f}"
        else:
            ratio = f"{'1':>6s}  {'':11s}  {'1':>9s}"
        lines.append(f"  {result['batch_size']:6d}  {name:18s} {side['images_per_s']:9,.0f} "
                     f"{side['ms_per_step']:9.2f}   {ratio}")
    return "\n".join(lines)


# issue 40's ratios, each the median over the interleaved pairs of blocks, and their bars (EPYC, batch 128)
BF16_PAIRS = (("project-bf16", "project"), ("project-bf16", "yardstick-bf16"), ("yardstick-bf16", "yardstick"),
              ("project-graph-bf16", "project-graph"))  # the last on CUDA only
BF16_BARS = {"project-bf16/project": 0.80, "project-bf16/yardstick-bf16": 1.0}

# the GPU bars of issue 20, as ratios to the eager yardstick at batch 128
BARS = {"project": 1.10, "project-graph": 0.90}


def format_bars(results: dict) -> list[str]:
    """Where each measured ratio stands against its bar."""
    lines = []
    for t in results["training"]:
        for name, bar in BARS.items():
            side = t["sides"].get(name)
            if side is not None and t["batch_size"] == 128:
                ratio = side["ratio_to_yardstick"]
                lines.append(f"  bar: {name}/yardstick at batch 128 {ratio:.3f}, at most {bar:.2f}: "
                             f"{'met' if ratio <= bar else 'missed'}")
    return lines


def format_report(results: dict) -> str:
    """The whole result as a plain-text table."""
    r = results
    nets = f"conv {tuple(r['conv_channels'])}" if r["arch"] == "conv" else f"mlp {r['hidden_dim']}"
    lines = [
        f"benchmarks/bench.py  {r['date']}  {r['device']} ({r['device_name']}, {r['threads']} threads)  "
        f"torch {r['torch']}  pyro {r['pyro']}",
        f"  {nets}, latent {r['latent_dim']}, {r['data']} ({r['num_train']:,} training images)",
        f"  training: {r['repeats']} interleaved pairs of {r['steps_per_block']}-step blocks after "
        f"{r['warmup_blocks']} warm-up blocks per side",
        "  ratio: median over the pairs of side/yardstick wall time per block; cpu ratio: the same with the "
        "process's CPU time",
        "",
        f"  {'batch':>6s}  {'side':18s} {'images/s':>9s} {'ms/step':>9s}   {'ratio':>6s}  {'quartiles':>11s}  "
        f"{'cpu ratio':>9s}",
    ]
    lines += [format_training_row(t) for t in r["training"]]
    for t in r["training"]:
        for pair, ratio in t.get("bf16", {}).items():
            bar = BF16_BARS.get(pair)
            verdict = f", bar at most {bar:.2f}: {'met' if ratio <= bar else 'missed'}" if bar else ""
            lines.append(f"  bf16 at batch {t['batch_size']}: {pair} {ratio:.3f}{verdict}")
    if r["device"].startswith("cuda"):
        lines += format_bars(r)
    memory = [t.get("peak_memory_bytes") or t.get("peak_rss_bytes") for t in r["training"]]
    if r["device"].startswith("cuda"):
        for t in r["training"]:
            per_side = ", ".join(f"{name} {_gib(b)}" for name, b in t["peak_memory_bytes"].items())
            lines.append(f"  peak GPU memory at batch {t['batch_size']}: {per_side}")
    elif memory:
        lines.append(f"  peak RSS of the process after training: {_gib(max(memory))}")
    e = r["evaluation"]
    if e:
        lines += [
            "",
            f"  evaluation: {e['test_images']:,} test images in batches of {e['eval_batch_size']}",
            f"    elbo_per_image (the per-epoch test ELBO) {e['elbo_per_image']['images_per_s']:9,.0f} images/s "
            f"({e['elbo_per_image']['seconds']:.2f} s)",
            f"    yardstick ELBO by hand                   {e['yardstick']['images_per_s']:9,.0f} images/s "
            f"({e['yardstick']['seconds']:.2f} s); ratio {e['ratio']:.3f}",
        ]
        ll = e["log_likelihood"]
        if ll:
            lines.append(f"    log p(x), K = {ll['k']} ({ll['function']}, chunk {ll['chunk']}): "
                         f"{ll['images_per_s']:,.1f} images/s on {ll['images']} images; the test set would take "
                         f"{ll['test_set_s'] / 60:.1f} min")
        else:
            lines.append("    log p(x): not measured (pyro_vae.evaluate has no importance_estimates, or --ll-images 0)")
        mem = e.get("peak_memory_bytes", e.get("peak_rss_bytes"))
        lines.append(f"    peak {'GPU memory' if 'peak_memory_bytes' in e else 'RSS of the process'}: {_gib(mem)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Time the trainer's SVI step against a hand-written PyTorch step on the same "
                    "networks, interleaved; time evaluation; report peak memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[defaults.batch_size],
                        help="one or more batch sizes, each measured on its own")
    parser.add_argument("--latent-dim", type=int, default=defaults.latent_dim)
    parser.add_argument("--arch", choices=("conv", "mlp"), default=defaults.arch)
    parser.add_argument("--conv-channels", type=int, nargs=2, default=list(defaults.conv_channels))
    parser.add_argument("--hidden-dim", type=int, default=defaults.hidden_dim)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved (project, yardstick) block pairs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks per side first")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, leave out the captured sides (project-graph, yardstick-graph)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time both steps in bf16 (project-bf16, yardstick-bf16; issue 40)")
    parser.add_argument("--stock-svi", action="store_true",
                        help="also time pyro.infer.SVI with pyro.optim.Adam, validation on every step: what the "
                             "trainer used before (side stock-svi)")
    parser.add_argument("--synthetic", action="store_true", help="random binary images instead of MNIST")
    parser.add_argument("--data-dir", default=defaults.data_dir)
    parser.add_argument("--train-size", type=int, default=0, help="first N training images (0: all 60,000)")
    parser.add_argument("--test-size", type=int, default=0, help="first N test images (0: all 10,000)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation timings")
    parser.add_argument("--eval-repeats", type=int, default=3, help="timed passes over the test set")
    parser.add_argument("--ll-images", type=int, default=100, help="test images for the K-sample log p(x) (0: skip)")
    parser.add_argument("--ll-k", type=int, default=1000, help="K, draws of z per image for log p(x)")
    parser.add_argument("--ll-chunk", type=int, default=100, help="draws of z per forward pass for log p(x)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, what the trainer uses)")
    parser.add_argument("--json", metavar="PATH", help="also write the results, every block time included, here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the flags; bad values exit with code 2 and a message naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("steps", "repeats", "eval_repeats", "ll_k", "ll_chunk", "latent_dim", "hidden_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    for flag in ("warmup", "ll_images", "train_size", "test_size", "threads"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be at least 0, not {getattr(args, flag)}")
    if min(args.batch_size) < 1 or max(args.batch_size) > (args.train_size or MNIST_TRAIN):
        parser.error(f"--batch-size must be between 1 and the number of training images, not {args.batch_size}")
    if min(args.conv_channels) < 1:
        parser.error(f"--conv-channels must be positive, not {args.conv_channels}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device must be cpu or cuda[:N], not {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was asked for, but this machine has no CUDA device; use --device cpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def save(results: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    results = run(args, save)
    print("\n" + format_report(results), flush=True)
    if args.json:
        print(f"bench: wrote {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
