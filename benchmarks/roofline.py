"""How near this machine's limit the trainer's step and evaluation's log p(x) run: a roofline (issue 30).

    uv run python benchmarks/roofline.py --threads 1 2
    uv run python benchmarks/roofline.py --threads 2 -- --likelihood pixelcnn    # any trainer flags after --

The model is the one the trainer's flags describe (its own parser; the default config without flags), built
by build_vae as the trainer builds it. FlopCounterMode counts the FLOPs of one training step (SVIStep, on a
batch drawn as the loop draws it) and of one evaluation batch (evaluate's `batch_figures`: K draws for
each of the images that `pass_sizing` puts in a batch, as `evaluate_run` takes them), and every convolution
and matrix product it counts is recorded with its shapes. Each such op is then run alone by torch's own
kernel on fresh tensors, in both layouts (contiguous, channels-last) and at each thread count: its best time
is what this machine attains for that op. The attainable time of a step or batch is the sum of its ops' best
times, the attainable GFLOP/s its FLOPs over that time; the fraction printed is achieved / attainable.
Everything is timed in the same run, in rounds (the step, the batch, then every op, each at every thread
count), and each figure is the median over the rounds, so a burst of load from another process hits all alike.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

if __package__ in (None, ""):  # run as a script: the project root on the path, as `-m benchmarks.roofline` has it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import ProjectTrainer  # noqa: E402
from pyro_vae import evaluate  # noqa: E402
from pyro_vae.config import Config, parse_args  # noqa: E402
from pyro_vae.data import load_mnist  # noqa: E402
from pyro_vae.model import build_vae  # noqa: E402
from pyro_vae.trained import TrainedVAE  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MIN_BLOCK_S = 0.02  # an op is timed over as many calls as take about this long: the clock's noise stays small


class TensorSpec(NamedTuple):
    """What an op was given in place of a tensor: enough to make a fresh one like it."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype


def _spec(value):
    """A tensor as its TensorSpec, lists as tuples (so that a call can be counted as a dictionary key)."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    return value


class OpCall(NamedTuple):
    """One convolution or matrix product as it ran: the aten op and its arguments, tensors as TensorSpecs."""

    func: torch._ops.OpOverload
    args: tuple
    kwargs: tuple  # (name, value) pairs

    def tensors(self) -> list[TensorSpec]:
        return [a for a in (*self.args, *dict(self.kwargs).values()) if isinstance(a, TensorSpec)]

    def has_layout(self) -> bool:
        """Whether a 4-D tensor takes part: then contiguous and channels-last are both tried."""
        return any(len(t.shape) == 4 for t in self.tensors())

    def describe(self) -> str:
        def shape(t: TensorSpec) -> str:  # a transposed matrix operand marked ^T
            transposed = len(t.shape) == 2 and t.stride[0] == 1 and t.shape[0] > 1 and t.shape[1] > 1
            return "x".join(map(str, t.shape)) + ("^T" if transposed else "")
        shapes = " ".join(shape(t) for t in self.tensors())
        name = self.func.overloadpacket.__name__
        if name.startswith("convolution"):
            transposed = self.args[6] if name == "convolution" else self.args[7]
            name += " (transposed)" if transposed else ""
        return f"{name} {shapes}"

    def inputs(self, layout: str | None) -> tuple[tuple, dict]:
        """Fresh random arguments: 4-D tensors in `layout`, the others with the strides they ran with (a matrix
        product's transposed operand stays transposed)."""
        def make(a):
            if not isinstance(a, TensorSpec):
                return list(a) if isinstance(a, tuple) else a
            if layout is not None and len(a.shape) == 4:
                return torch.randn(a.shape, dtype=a.dtype).contiguous(memory_format=LAYOUTS[layout])
            base = [1 if step == 0 else size for size, step in zip(a.shape, a.stride)]  # broadcast dims: size 1
            return torch.empty_strided(base, a.stride, dtype=a.dtype).normal_().expand(a.shape)
        return tuple(make(a) for a in self.args), {k: make(v) for k, v in self.kwargs}


class _Recorder(TorchDispatchMode):
    """Records each call of an op that FlopCounterMode has a formula for (convolutions, matrix products)."""

    def __init__(self):
        super().__init__()
        self.calls: list[OpCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in flop_registry:
            self.calls.append(OpCall(func, _spec(args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))))
        return func(*args, **kwargs)


def count(fn: Callable[[], object]) -> tuple[int, Counter]:
    """FLOPs of one call of fn as FlopCounterMode counts them, and how often each counted op ran in it."""
    recorder = _Recorder()
    with FlopCounterMode(display=False) as counter, recorder:
        fn()
    return counter.get_total_flops(), Counter(recorder.calls)


def op_flops(op: OpCall) -> int:
    """FlopCounterMode's count for one call of op."""
    args, kwargs = op.inputs(None)
    with FlopCounterMode(display=False) as counter:
        op.func(*args, **kwargs)
    return counter.get_total_flops()


def _block(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call of fn, over a block of calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


class Timer:
    """One thing to time at one thread count: a call, repeated in blocks of about MIN_BLOCK_S (calibrated once)."""

    def __init__(self, fn: Callable[[], object], threads: int):
        self.fn, self.threads, self.seconds = fn, threads, []
        with _threads(threads):
            fn()  # first calls choose kernels and allocate
            self.calls = max(1, math.ceil(MIN_BLOCK_S / max(_block(fn, 1), 1e-6)))

    def run(self) -> None:
        with _threads(self.threads):
            self.seconds.append(_block(self.fn, self.calls))

    def median(self) -> float:
        return statistics.median(self.seconds)


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


# ---------------------------------------------------------------------------------------------------
# The two workloads: the trainer's step and one batch of evaluate_run


def training_step(config: Config, data) -> Callable[[], object]:
    """One training step of the trainer (bench's ProjectTrainer: the VAE from build_vae, SVIStep), each call on a
    fresh batch of the kind most of the loop's are (labels used, except semi-supervised); the first step (with
    Pyro's checks) already taken."""
    side = ProjectTrainer(config, data.num_train, torch.device(config.device))
    labelled = data.labelled is None

    def step():
        indices = torch.randint(0, data.num_train, (config.batch_size,), device=data.train_images.device)
        with side.scope():
            return side.svi.step(*data.batch(indices, labelled))

    step()
    return step


def evaluation_batch(config: Config, data, k: int) -> tuple[Callable[[], object], evaluate.Sizing]:
    """One batch of evaluate_run on the CPU (batch_figures: k draws for each image, in the automatic sizing), on
    the first test images, with the model built as `pyro_vae.load` builds it."""
    device = torch.device(config.device)
    run = TrainedVAE(build_vae(config).to(device), config)
    images = data.test_images
    labels = data.test_labels if run.labels_observed else None  # the label-conditioned model is told y
    sizing = evaluate.pass_sizing(run.vae, images, None if labels is None else labels[:1], k=k, device=device)
    x, y = images[:sizing.batch_size], None if labels is None else labels[:sizing.batch_size]

    def batch():
        return evaluate.batch_figures(run, x, y, k=k, chunk=sizing.chunk)

    return batch, sizing


# ---------------------------------------------------------------------------------------------------
# The roofline


def roofline(workloads: dict[str, Callable[[], object]], threads: list[int], rounds: int,
             log: Callable[[str], None] = lambda line: None) -> dict:
    """For each workload: its FLOPs, its time and GFLOP/s at each thread count, and its attainable time (the sum of
    its ops' best times over layouts and thread counts); and for each op, its time in each layout at each count."""
    counted = {name: count(fn) for name, fn in workloads.items()}
    ops = sorted({op for _, calls in counted.values() for op in calls}, key=OpCall.describe)
    run_timers = {(name, n): Timer(fn, n) for name, fn in workloads.items() for n in threads}
    op_timers = {}
    for op in ops:
        for layout in (LAYOUTS if op.has_layout() else [None]):
            args, kwargs = op.inputs(layout)
            for n in threads:
                op_timers[(op, layout, n)] = Timer(lambda op=op, a=args, kw=kwargs: op.func(*a, **kw), n)
    log(f"roofline: {len(ops)} distinct ops, {len(run_timers) + len(op_timers)} things to time, {rounds} rounds")
    for r in range(rounds):
        for timer in [*run_timers.values(), *op_timers.values()]:
            timer.run()
        log(f"roofline: round {r + 1} of {rounds} done")

    op_rows = []
    best = {}
    for op in ops:
        times = {(layout, n): t.median() for (o, layout, n), t in op_timers.items() if o == op}
        (layout, n), seconds = min(times.items(), key=lambda item: item[1])
        best[op] = seconds
        flops = op_flops(op)
        op_rows.append({"op": op.describe(), "flops": flops, "best_s": seconds, "best_layout": layout,
                        "best_threads": n, "gflops": {f"{layout or 'as run'}/{n}": flops / s / 1e9
                                                      for (layout, n), s in times.items()}})
    results = {"ops": op_rows, "workloads": {}}
    for name, (flops, calls) in counted.items():
        attainable = sum(best[op] * times for op, times in calls.items())
        counted_flops = sum(op_flops(op) * times for op, times in calls.items())
        rows = {}
        for n in threads:
            seconds = run_timers[(name, n)].median()
            rows[n] = {"seconds": seconds, "gflops": flops / seconds / 1e9, "fraction": attainable / seconds,
                       "seconds_each_round": run_timers[(name, n)].seconds}
        results["workloads"][name] = {"flops": flops, "flops_of_recorded_ops": counted_flops,
                                      "attainable_s": attainable, "attainable_gflops": flops / attainable / 1e9,
                                      "ops": {op.describe(): times for op, times in calls.items()},
                                      "threads": rows}
    return results


def format_report(results: dict) -> str:
    lines = [f"roofline: {results['model']}; {results['device']} ({results['cpu']}), torch {results['torch']}; "
             f"median of {results['rounds']} rounds",
             f"  attainable: each convolution and matrix product alone in torch's kernel, at its best layout and "
             f"thread count ({', '.join(map(str, results['threads']))})", "",
             f"  {'':42s} {'GFLOP':>8s} {'threads':>7s} {'ms':>9s} {'GFLOP/s':>8s} {'attainable':>10s} "
             f"{'of attainable':>13s}"]
    for name, w in results["workloads"].items():
        for i, (n, row) in enumerate(w["threads"].items()):
            head = f"{name:42s} {w['flops'] / 1e9:8.3f}" if i == 0 else f"{'':42s} {'':8s}"
            lines.append(f"  {head} {n:>7} {row['seconds'] * 1e3:9.1f} {row['gflops']:8.2f} "
                         f"{w['attainable_gflops']:10.2f} {row['fraction']:13.0%}")
    columns = sorted({key for row in results["ops"] for key in row["gflops"]},
                     key=lambda key: (key.split("/")[0], int(key.split("/")[1])))
    lines += ["", "  GFLOP/s of each op alone (layout/threads); calls per step or batch",
              f"  {'op':68s} {'MFLOP':>8s} " + " ".join(f"{c:>17s}" for c in columns) + "  calls"]
    for row in results["ops"]:
        calls = ", ".join(f"{name.split(' ')[0]} {w['ops'][row['op']]}" for name, w in results["workloads"].items()
                          if row["op"] in w["ops"])
        cells = [f"{row['gflops'][c]:17.2f}" if c in row["gflops"] else f"{'':17s}" for c in columns]
        lines.append(f"  {row['op'][:68]:68s} {row['flops'] / 1e6:8.1f} " + " ".join(cells) + f"  {calls}")
    gemm = results["gemm"]
    for dtype, key in (("float32", "gflops"), ("bfloat16", "gflops_bf16")):
        lines.append(f"  the hardware's peak: a {gemm['size']}^2 {dtype} matrix product, "
                     + ", ".join(f"{n} thread(s) {g:.1f} GFLOP/s" for n, g in gemm[key].items()))
    for name, w in results["workloads"].items():  # "of attainable" is of torch's per-op best; this is of the peak
        lines.append(f"  {name}: " + ", ".join(
            f"{n} thread(s) {row['gflops'] / gemm['gflops'][n]:.0%} of the fp32 peak, "
            f"{row['gflops'] / gemm['gflops_bf16'][n]:.0%} of the bf16 peak" for n, row in w["threads"].items()))
    return "\n".join(lines)


def gemm_reference(threads: list[int], size: int = 1024) -> dict:
    """GFLOP/s of one large square matrix product (the best of a few blocks), in float32 and in bfloat16, at each
    thread count: the machine's peak as torch's BLAS and oneDNN reach it, for scale (where the CPU has no bf16 dot
    product, bf16 is emulated and slower)."""
    result = {"size": size}
    for key, dtype in (("gflops", torch.float32), ("gflops_bf16", torch.bfloat16)):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        result[key] = {}
        for n in threads:
            timer = Timer(lambda: a @ b, n)
            for _ in range(3):
                timer.run()
            result[key][n] = 2 * size ** 3 / min(timer.seconds) / 1e9
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, trainer_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python benchmarks/roofline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [options] [-- TRAINER FLAGS]")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch thread counts to time everything at (default: torch's)")
    parser.add_argument("--k", type=int, default=1000, help="draws of z per image in the evaluation batch")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timing (every workload and op once each)")
    parser.add_argument("--no-eval", action="store_true", help="the training step only")
    parser.add_argument("--no-train", action="store_true", help="the evaluation batch only")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = parser.parse_args(own)
    if min(args.threads) < 1 or args.k < 1 or args.rounds < 1:
        parser.error("--threads, --k and --rounds must be at least 1")
    config = parse_args(["--device", "cpu", *trainer_flags])  # the trainer's checks; exits 2 on a bad flag
    if config.device != "cpu":
        parser.error(f"the roofline is this CPU's: --device {config.device} is not measured here")
    data = load_mnist(config.data_dir, binarize=config.binarize, device=config.device,
                      train_size=config.train_size or 10_000, test_size=config.test_size or 1000)
    if config.labels:
        data.keep_labels(config.labels, config.seed)
    torch.manual_seed(config.seed)
    workloads = {}
    if not args.no_train:
        workloads[f"training step (batch {config.batch_size})"] = training_step(config, data)
    if not args.no_eval:
        batch, sizing = evaluation_batch(config, data, args.k)
        workloads[f"log p(x) batch ({sizing.batch_size} img x K {args.k}, {sizing.chunk} a pass)"] = batch
    if not workloads:
        parser.error("--no-eval and --no-train leave nothing to measure")
    results = roofline(workloads, sorted(set(args.threads)), args.rounds,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    results.update(model=" ".join(trainer_flags) or "the default config", device=config.device,
                   cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                   threads=sorted(set(args.threads)), rounds=args.rounds,
                   gemm=gemm_reference(sorted(set(args.threads))))
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
