"""The SVI training loop; `python -m pyro_vae.train` is a thin shell over `train(config)` and `resume(run)`."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from .checkpoint import (CHECKPOINT_NAME, METRICS_NAME, CheckpointError, read_checkpoint, run_directory,
                         save_checkpoint, write_atomically)
from .config import Config, parse_command_line
from .data import DataError
from .datasets import fill_config, load_data
from .estimators import make_elbo  # noqa: F401 (tests and benchmarks import it from here)
from .evaluate import elbo_and_kl_per_image, kl_per_image
from . import distributed, plot, precision
from .model import build_vae
from .step import GRAPH_WARMUP_STEPS, MAX_GRAPHS, Objective, SVIStep  # noqa: F401 (SVIStep's home is step.py)
from .tensorboard_log import FOLDER as TENSORBOARD_FOLDER, epoch_board
from .trained import TrainedVAE

NUM_RECONSTRUCTIONS_SHOWN = 32  # fixed test digits, shown above their reconstructions
LOSS_READ_EVERY = 50  # steps between reads of the losses on the host: each read waits for the GPU to catch up
BEST_NAME = "best.pt"
LOCK_NAME = ".lock"  # in the run directory while a training writes there


class RunDirError(Exception):
    """The run directory cannot be used."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was checkpointed after the step in progress."""

    def __init__(self, run_dir: Path, signum: int):
        self.run_dir, self.signum = run_dir, signum
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped and saved {run_dir / CHECKPOINT_NAME}; "
                         f"continue with: python -m pyro_vae.train --resume {run_dir}")


class Paused(Exception):
    """The run stopped, checkpointed, after the epochs that --stop-after asked of this session."""

    def __init__(self, run_dir: Path, epochs: int):
        super().__init__(f"stopped after {epochs} epoch(s) of this session, as --stop-after asked, and saved "
                         f"{run_dir / CHECKPOINT_NAME}; continue with: python -m pyro_vae.train --resume {run_dir}")


class Diverged(Exception):
    """The loss stopped being a finite number."""


class ConfigError(Exception):
    """A saved config that cannot run here (a value out of range, or a device this machine lacks)."""


class OutOfMemory(Exception):
    """The model this config describes does not fit in memory."""


def _out_of_memory(e: BaseException) -> bool:
    """torch's CPU allocator reports a failed allocation as a plain RuntimeError, CUDA's as OutOfMemoryError."""
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e)


def _tried(e: BaseException) -> str:
    """How much the failed allocation asked for, as torch words it, if it says."""
    found = re.search(r"ried to allocate ([0-9.]+ ?\w+)", str(e))
    return f" (it tried to allocate {found.group(1)})" if found else ""


class RunLock:
    """A lock on a run directory, held for as long as one training writes there: a second one is refused.

    An flock on RUN/.lock, which holds the owner's process id. The kernel drops the flock when its process
    dies, however it dies; a lock file whose flock is free is the stale lock of a run that was killed, and
    is taken over with a line saying so.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot create run directory {out}: {e.strerror or e}") from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunDirError(f"run directory {out} is in use by another training (process {owner}); wait for it "
                              "to end, or choose another --out") from None
        previous = os.read(self.fd, 32).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            print(f"pyro_vae: taking over the lock of {out}, left by process {previous}, which ended without "
                  "releasing it", file=sys.stderr, flush=True)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)  # while still held: no other run can take the lock of a dead file
        os.close(self.fd)


def make_run_dir(config: Config, overwrite: bool = False) -> tuple[Path, RunLock]:
    """The run directory (created) and its lock, held; an existing run in it is an error unless overwrite."""
    out = Path(config.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}").expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that cannot be created or written, or a file in the way
        raise RunDirError(f"cannot create run directory {out}: {e.strerror or e}") from e
    lock = RunLock(out)  # before anything in the directory is read or removed
    try:
        if (out / CHECKPOINT_NAME).exists() or (out / METRICS_NAME).exists():
            if not overwrite:
                raise RunDirError(f"run directory {out} already holds a run; choose another --out, "
                                  f"continue it with --resume {out}, or replace it with --overwrite")
            for entry in out.iterdir():  # all but the lock, which this run holds
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.name != LOCK_NAME:
                    entry.unlink()
        (out / "images").mkdir(exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return out, lock


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Run a block on a fixed random stream without disturbing the training stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _own_rng_state(saved: dict | list[dict], ranks: distributed.Ranks, path: Path) -> dict:
    """This rank's streams from a checkpoint, which holds one per rank (before, one dict: rank 0's)."""
    if isinstance(saved, dict):
        return saved
    if len(saved) != ranks.world:
        raise CheckpointError(f"{path} was saved by {len(saved)} training process(es); resume it with as many "
                              f"(now {ranks.world}), so that each one continues its own random stream")
    return saved[ranks.rank]


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step; a second signal stops at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _read_losses(pending: list[torch.Tensor], step: int, epoch: int, config: Config, out: Path) -> list[float]:
    """The losses of the steps up to `step`, read from the device in one go; a non-finite one stops the run."""
    values = torch.stack(pending).tolist()
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise Diverged(f"step {step - len(values) + offset + 1} (epoch {epoch}): the loss became {value} "
                           f"(read at step {step}). The learning rate (--lr {config.lr}) is probably too high. "
                           f"The last good checkpoint is kept in {out / CHECKPOINT_NAME}.")
    return values


def kl_weight(config: Config, epochs_done: float) -> float:
    """beta, raised linearly from 0 over the warm-up epochs."""
    if config.kl_warmup_epochs == 0:
        return config.beta
    return config.beta * min(1.0, epochs_done / config.kl_warmup_epochs)


def free_bits_weight(vae, x: torch.Tensor, y: torch.Tensor | None, weight: float, config: Config) -> float:
    """The KL weight of a step under free bits (Kingma et al. 2016, one group): `weight`, or 0 where the
    minibatch's KL term is under config.free_bits nats per image.

    Free bits make the objective's KL term max(free_bits, KL), KL the minibatch's mean: its gradient is the KL's
    above the floor and 0 under it. So under it the step's KL weight is 0 and Pyro's ELBO fits log p(x | z)
    alone, which lets the encoder put more into z. The KL is a single-sample estimate on the step's own images,
    from a draw of z of its own (one more pass of the guide and the prior, without gradients and without the
    decoder: `kl_per_image`); under torchrun each rank decides on its own shard.
    """
    if not config.free_bits or not weight:
        return weight
    with torch.no_grad(), precision.autocast(config.precision, x.device):
        kl = kl_per_image(vae, x, y).mean()
    return weight if kl.item() > config.free_bits else 0.0


@torch.no_grad()
def test_figures(trained: TrainedVAE, data) -> dict:
    """Unweighted test ELBO and its KL term (nats per image) and, for a model with a classifier, the accuracy of
    q(y | x)."""
    labels = data.test_labels if trained.labels_observed else None
    elbo, kl = elbo_and_kl_per_image(trained.vae, data.test_images, labels, batch_size=trained.config.eval_batch_size)
    figures = {"test_elbo": elbo.mean().item(), "test_kl": kl.mean().item()}
    if trained.vae.classifier is not None:
        figures["test_accuracy"] = (trained.classify(data.test_images) == data.test_labels).float().mean().item()
    return figures


def _end_of_epoch(trained: TrainedVAE, data, out: Path, epoch: int, step: int, losses: list[float],
                  seconds: float, board=None, floored: int = 0) -> dict:
    """Evaluate, draw the epoch's pictures, print its line and append it to metrics.jsonl (and, with a board,
    write both to TensorBoard).

    `train_objective` is the mean of what SVI maximized over the epoch, per image: the ELBO only with
    --beta 1, no KL warm-up or free bits, no classifier term and --elbo trace or meanfield (--elbo iwae: the
    K-sample bound). `test_elbo` is always the unweighted ELBO.
    """
    config, vae = trained.config, trained.vae
    vae.eval()
    shown = data.test_images[:NUM_RECONSTRUCTIONS_SHOWN]
    (out / "images").mkdir(exist_ok=True)  # a resumed run's folder may have come without its pictures
    with _seeded(config.seed, trained.device):  # the same z for the test ELBO and pictures every epoch
        figures = test_figures(trained, data)
        plot.image_grid(trained.sample_grid(), out / "images" / f"samples_{epoch:03d}.png")
        reconstructions = trained.reconstruct(shown, data.test_labels[:NUM_RECONSTRUCTIONS_SHOWN])
        plot.reconstruction_grid(shown, reconstructions, out / "images" / f"recon_{epoch:03d}.png")
    row = {"epoch": epoch, "step": step, "train_objective": -sum(losses) / len(losses) / data.num_train, **figures,
           "seconds": seconds, "images_per_s": len(losses) * config.batch_size / seconds,
           "kl_weight": vae.kl_weight}
    if config.free_bits:
        row["kl_floored"] = floored / len(losses)  # the fraction of the epoch's steps free bits left without a KL term
    accuracy = f"  accuracy {figures['test_accuracy']:.4f}" if "test_accuracy" in figures else ""
    print(f"epoch {epoch:3d}/{config.epochs}  train objective {row['train_objective']:9.2f}  "
          f"test ELBO {figures['test_elbo']:9.2f}{accuracy}  {seconds:6.1f} s  "
          f"{row['images_per_s']:7.0f} img/s", flush=True)
    with open(out / METRICS_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")
    if board is not None:
        board.write(row, {"samples": out / "images" / f"samples_{epoch:03d}.png",
                          "reconstructions": out / "images" / f"recon_{epoch:03d}.png"})
    return figures


def _drop_metrics_after(out: Path, epoch: int) -> None:
    """Forget metrics.jsonl's lines past the checkpoint's epoch: a kill between an epoch's line and its
    checkpoint leaves a line that the resumed run writes again."""
    path = out / METRICS_NAME
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)

    def line_epoch(line: str) -> float:
        try:
            return json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            return math.inf  # a line cut short by the kill
    kept = [line for line in lines if line.endswith("\n") and line_epoch(line) <= epoch]
    if kept != lines:
        write_atomically(path, lambda f: f.write("".join(kept).encode()))


def train(config: Config, overwrite: bool = False, stop_after: int = 0, tensorboard: bool = False) -> Path:
    """Train the VAE that config describes; return the run directory it wrote. stop_after > 0: stop with a
    checkpoint (Paused) after that many epochs, for resume to continue. tensorboard: also write each epoch
    into RUN/tensorboard."""
    ranks = distributed.setup(torch.device(config.device).type)
    if config.precision == "auto":  # decided once, here: the run's config (and every checkpoint) holds the choice
        config.precision, why = precision.resolve(config.precision, torch.device(config.device))
        if ranks.is_main:
            print(f"pyro_vae: --precision auto: {config.precision} ({why})", flush=True)
    if config.init_from:  # before the run directory is made: a wrong path costs nothing
        try:
            read_checkpoint(config.init_from)
        except CheckpointError as e:
            raise CheckpointError(f"--init-from: {e}") from e
    lock = None
    if ranks.is_main:  # under torchrun only rank 0 writes the run directory
        out, lock = make_run_dir(config, overwrite)
        config.out = str(out)
        if tensorboard:
            _check_board_folder(out, lock)
    return _fit(config, Path(config.out), None, ranks, lock, stop_after, tensorboard)


def _check_board_folder(out: Path, lock: RunLock) -> None:
    """RunDirError (releasing the lock) where RUN/tensorboard cannot be the folder --tensorboard writes into:
    found before training starts, not at the first epoch's end."""
    folder = out / TENSORBOARD_FOLDER
    if folder.exists() and not folder.is_dir():
        lock.release()
        raise RunDirError(f"--tensorboard writes into {folder}, which is a file: move it away, or train without "
                          "--tensorboard")


def resume(run_dir: str | Path, stop_after: int = 0, tensorboard: bool = False) -> Path:
    """Continue an interrupted run from its last checkpoint, with its saved config, to the same end (or, with
    stop_after > 0, for that many more epochs, as train's). It continues the run's TensorBoard curves where it
    has them (RUN/tensorboard), or begins them with tensorboard."""
    out = run_directory(run_dir)
    # rank 0 locks first: a run still training there is "in use", whatever its checkpoint says
    lock = RunLock(out) if out.is_dir() and distributed.launched_rank() == 0 else None
    try:
        state = read_checkpoint(run_dir)
        if "optimizer" not in state:  # a shipped run: pretrained/ keeps the weights alone
            raise CheckpointError(f"--resume {run_dir}: it holds weights only, no optimizer state to continue; "
                                  f"begin a new run from its weights with --init-from {run_dir}")
        try:
            config = Config.from_dict(state["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{run_dir} holds a checkpoint of another version of pyro_vae: {e}") from e
        problems = config.errors()  # what the command line checks for a new run: the machine may have changed
        if problems:
            raise ConfigError(f"--resume {run_dir}: its saved config cannot run here: {'; '.join(problems)}")
        ranks = distributed.setup(torch.device(config.device).type)
    except BaseException:
        if lock:
            lock.release()
        raise
    tensorboard = tensorboard or (out / TENSORBOARD_FOLDER).is_dir()  # the same curves, continued
    if tensorboard and lock:
        _check_board_folder(out, lock)
    return _fit(config, out, state, ranks, lock, stop_after, tensorboard)


def _fit(config: Config, out: Path, state: dict | None, ranks: distributed.Ranks, lock: RunLock | None,
         stop_after: int = 0, tensorboard: bool = False) -> Path:
    """The loop shared by train and resume: state is a checkpoint to continue from, or None; lock is the run
    directory's (rank 0's), released at the end however the run ends."""
    failed = True  # a rank that failed leaves without waiting for its peers, who may never come
    try:
        result = _loop(config, out, state, ranks, stop_after, tensorboard)
        failed = False
        return result
    except (Interrupted, Paused):  # every rank stops after the same step, as agreed
        failed = False
        raise
    finally:
        if lock:
            lock.release()
        distributed.teardown(ranks, failed)


def _init_from(vae, run: str) -> None:
    """Load another run's weights into vae (which the optimizer then starts from afresh); CheckpointError naming
    the parameters whose shapes differ, or that one of the two lacks."""
    weights = read_checkpoint(run)["model"]
    ours = vae.state_dict()
    differ = [f"{name} is {tuple(weights[name].shape)} there, {tuple(ours[name].shape)} here"
              for name in ours if name in weights and weights[name].shape != ours[name].shape]
    differ += [f"{name} is missing there" for name in ours if name not in weights]
    differ += [f"{name} is not in this model" for name in weights if name not in ours]
    if differ:
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise CheckpointError(f"--init-from {run}: its weights do not fit this model: {'; '.join(differ[:3])}{more}; "
                              "give the flags of the run it was trained with")
    vae.load_state_dict(weights)


def _loop(config: Config, out: Path, state: dict | None, ranks: distributed.Ranks, stop_after: int = 0,
          tensorboard: bool = False) -> Path:
    if ranks.is_main:
        print(f"pyro_vae: {'resuming' if state else 'training'} in {out}\n{config.describe()}", flush=True)
    device = torch.device(config.device)
    if device.type == "cuda" and ranks.active:
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every training batch has one shape: time the conv algorithms once
    pyro.set_rng_seed(config.seed)
    data = load_data(config, device=device)
    fill_config(config, data)  # the networks are sized from the data, and the checkpoint says how
    if state is None and ranks.is_main:
        config.save(out / "config.json")
    if config.labels:
        data.keep_labels(config.labels, config.seed)
    try:
        vae = build_vae(config, num_data=data.num_train).to(device)
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        raise OutOfMemory(f"out of memory while building the model{_tried(e)}: choose a smaller --latent-dim "
                          f"(now {config.latent_dim}), --hidden-dim, --conv-channels or --prior-components") from e
    if state is None and config.init_from:
        _init_from(vae, config.init_from)
    trained = TrainedVAE(vae, config)
    if ranks.active:
        distributed.broadcast_parameters(vae, ranks)
        pyro.set_rng_seed(config.seed + ranks.rank)  # each rank its own noise; the batch order is shared below

    pyro.clear_param_store()  # params of an earlier model in this process must not leak into this one
    stop = _StopRequest()
    svi = SVIStep(vae, config, ranks, stop)

    epoch, step, plan, position, losses, best = 1, 0, None, 0, [], -math.inf
    floored = 0  # this epoch's steps whose KL weight free bits set to 0
    pending = []  # this epoch's losses not yet read from the device
    seconds_before = 0.0  # of an epoch interrupted and resumed: the time its first part took
    if state is not None:
        vae.load_state_dict(state["model"])
        svi.load_state(state["optimizer"], out)
        _set_rng_state(_own_rng_state(state["rng"], ranks, out), device)
        epoch, step, best = state["epoch"] + 1, state["step"], state.get("best_test_elbo", -math.inf)
        if ranks.is_main:
            _drop_metrics_after(out, state["epoch"])
        if state.get("plan") is not None:  # interrupted inside an epoch: finish that epoch's plan
            plan = [(idx.to(device), labelled) for idx, labelled in zip(state["plan"], state["plan_labelled"])]
            position, losses = state["position"], list(state["epoch_losses"])
            floored = state.get("epoch_floored", 0)
            seconds_before = state.get("epoch_seconds", 0.0)
    # where each process of the run began (a start, then each --resume): what a results row says was resumed
    began = {"step": step, "began": datetime.now().isoformat(timespec="seconds"), "device": str(device),
             "threads": torch.get_num_threads(), "processes": ranks.world}
    sessions = [*(state or {}).get("sessions", []), began]

    def checkpoint(epochs_done: int, rng: list[dict], **extra) -> dict:
        snapshot = {"config": config.to_dict(), "epoch": epochs_done, "step": step,
                    "model": vae.state_dict(), "optimizer": svi.optimizer.state_dict(), "rng": rng,
                    "param_store": {name: p.detach() for name, p in pyro.get_param_store().items()},
                    "best_test_elbo": best, "sessions": sessions, **extra}
        save_checkpoint(out / CHECKPOINT_NAME, snapshot)
        return snapshot

    first_epoch = epoch  # of this session: what stop_after counts from
    with stop, epoch_board(out, first_epoch, tensorboard and ranks.is_main) as board:
        while epoch <= config.epochs and not (config.max_steps and step >= config.max_steps):
            vae.train()
            start = time.perf_counter() - seconds_before  # the epoch's seconds count its part before a resume
            # the batch order comes from its own seeded stream, the same on every rank
            plan = plan or data.plan_epoch(config.batch_size,
                                           torch.Generator(device).manual_seed(config.seed * 1_000_003 + epoch))
            bar = tqdm(total=len(plan), initial=position, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                       disable=None if ranks.is_main else True)
            for i in range(position, len(plan)):
                indices, labelled = plan[i]
                x, y = data.batch(indices.chunk(ranks.world)[ranks.rank], labelled)  # this rank's shard
                vae.kl_weight = free_bits_weight(vae, x, y, kl_weight(config, epoch - 1 + (i + 1) / len(plan)),
                                                 config)
                floored += config.free_bits > 0 and vae.kl_weight == 0
                pending.append(svi.step(x, y))  # on the device; read every LOSS_READ_EVERY steps, not each step
                step += 1
                bar.update()
                stopping = svi.stop_requested()  # under torchrun the ranks' agreed flag: all stop after this step
                if (len(pending) == LOSS_READ_EVERY or stopping or i + 1 == len(plan)
                        or step == config.max_steps):  # read (and check) before any checkpoint is written
                    losses += _read_losses(pending, step, epoch, config, out)
                    pending = []
                    bar.set_postfix(objective=f"{-sum(losses[-20:]) / len(losses[-20:]) / data.num_train:.2f}")
                if stopping and i + 1 < len(plan):
                    bar.close()
                    rng = distributed.all_gather(_rng_state(device), ranks)  # each rank resumes its own stream
                    if ranks.is_main:
                        checkpoint(epoch - 1, rng, plan=[idx.cpu() for idx, _ in plan],
                                   plan_labelled=[lab for _, lab in plan], position=i + 1, epoch_losses=losses,
                                   epoch_floored=floored,
                                   epoch_seconds=time.perf_counter() - start)
                    raise Interrupted(out, stop.signum or signal.SIGTERM)  # SIGTERM: another rank's signal
                if step == config.max_steps:
                    break
            bar.close()
            seconds = time.perf_counter() - start
            rng = distributed.all_gather(_rng_state(device), ranks)
            if ranks.is_main:  # evaluation, pictures and checkpoints are rank 0's
                figures = _end_of_epoch(trained, data, out, epoch, step, losses, seconds, board, floored)
                improved, best = figures["test_elbo"] > best, max(best, figures["test_elbo"])
                snapshot = checkpoint(epoch, rng)
                if improved:
                    save_checkpoint(out / BEST_NAME, snapshot)
            if svi.stop_requested():  # the last step's agreed flag: a later signal stops the next epoch's first step
                raise Interrupted(out, stop.signum or signal.SIGTERM)
            if stop_after and epoch - first_epoch + 1 >= stop_after and epoch < config.epochs:
                raise Paused(out, stop_after)  # the same on every rank: each counts the same epochs
            epoch, plan, position, losses, seconds_before, floored = epoch + 1, None, 0, [], 0.0, 0
    if not ranks.is_main:
        return out
    plot.loss_curve(out)
    print(f"pyro_vae: done; load the run with pyro_vae.load({str(out)!r})", flush=True)
    return out


def main(argv=None, prog: str = "python -m pyro_vae.train") -> int:
    """The command line: parse flags (exit 2 on bad ones), then train or resume."""
    config, options = parse_command_line(argv, prog)
    try:
        if options.resume:
            resume(options.resume, stop_after=options.stop_after, tensorboard=options.tensorboard)
        else:
            train(config, overwrite=options.overwrite, stop_after=options.stop_after, tensorboard=options.tensorboard)
    except Paused as e:  # what was asked: not an error
        print(f"pyro_vae: {e}", flush=True)
        return 0
    except Interrupted as e:
        print(f"\npyro_vae: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM: stopped at once, inside a step or a write
        run = options.resume or config.out
        print(f"\npyro_vae: stopped at once by a second signal; the last checkpoint in {run} is kept (continue "
              f"with: python -m pyro_vae.train --resume {run})", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device of the run directory {options.resume or config.out} "
              f"(writing {e.filename or 'a file'}); the last checkpoint there is kept", file=sys.stderr)
        return 1
    except ConfigError as e:  # a bad value, like a bad flag
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, RunDirError, CheckpointError, Diverged, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:  # CUDA's OutOfMemoryError is a RuntimeError, and so is the CPU's
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory{_tried(e)}; try a smaller --batch-size (now {config.batch_size}) "
              f"or --eval-batch-size (now {config.eval_batch_size})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
