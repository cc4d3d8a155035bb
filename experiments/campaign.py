"""One command that turns a lent GPU's 15-minute window into the project's GPU figures; docs/gpu.md says how.

    bash experiments/gpu_campaign.sh                          # on the GPU machine: the first call
    bash experiments/gpu_campaign.sh --budget 240             # a second call, only if the window has time left
    uv run python experiments/campaign.py --tiny --out /tmp/o   # the same plan, every step tiny, on this CPU
    uv run python experiments/campaign.py --collect DIR       # here: keep DIR as the state, add its rows

A window is WINDOW_S (15 minutes) of device time, all tries together; a machine start costs 1-2 minutes
of it, and no machine starts with under 4 minutes left. So one start, then a first call of at most
FIRST_CALL_S (8 minutes) that yields the most, in this order (STEPS): the CUDA tests, most important
first (stopped at 2 minutes); the benchmark at batch 128 and 512, eager and captured, against the
hand-written step, in fp32 and in bf16 (stopped at 2 minutes); conv32 in full (100 epochs), evaluated with
K=1000 on all 10,000 test images. Then, in the time left or in a second call (only if the window has time left): the
frontier's best short row in full (pixelcnn_flow_iaf_32x6_freebits16, 100 epochs), the autoregressive row
(pixelcnn_gpu, 300 epochs: as many as fit, resumed by later windows) and the semi-supervised rows. Each call
prints its plan with estimated seconds before it starts.
Rows that cannot fit a window (OUT_OF_PLAN: best, the K = 50 IWAE rows, the 300-epoch moonshot) are
not in the plan; `--only NAME` still runs one.

Each step stops cleanly at its budget: a command (tests, bench) gets SIGINT there (pytest prints what
ran; the bench has already written each batch size's figures), a training run SIGTERM at the end of
the call (the trainer checkpoints and exits) and the next call resumes it. Everything lives in a work
folder (state.json says which steps are done); at the end of a call it is packed into OUT beside the
readable outputs, and the next call unpacks that copy from --state when it is newer than its own.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE)] + ([str(ROOT)] if str(ROOT) not in sys.path else [])  # run.py is a script beside this

import digit_classifier  # noqa: E402
import run as runner  # noqa: E402
from pyro_vae import Config, load  # noqa: E402
from pyro_vae.checkpoint import CHECKPOINT_NAME, CheckpointError, read_checkpoint  # noqa: E402
from pyro_vae.train import BEST_NAME  # noqa: E402

WINDOW_S = 15 * 60  # a GPU window: device time for all tries together
START_S = (60, 120)  # what a machine start costs of it
MIN_START_LEFT_S = 4 * 60  # no machine starts with less left
FIRST_CALL_S = 8 * 60  # the first call's budget (the device tool allows 600 s a command)

BENCH_COMMAND = ["-m", "benchmarks.bench"]  # how `python` runs the benchmark: the one place to repoint it
BENCH_ARGS = ["--bf16", "--batch-size", "128", "512", "--steps", "25", "--repeats", "10", "--warmup", "1",
              "--eval-repeats", "1", "--ll-images", "200"]
BENCH_TINY_ARGS = ["--bf16", "--synthetic", "--train-size", "256", "--test-size", "64", "--batch-size", "16",
                   "--arch", "mlp", "--hidden-dim", "16", "--latent-dim", "4", "--steps", "1", "--repeats", "1",
                   "--warmup", "0", "--eval-repeats", "1", "--ll-images", "4", "--ll-k", "4", "--ll-chunk", "4"]
CUDA_TESTS = ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "--durations", "15", "tests/test_cuda.py"]
FULL_RUNS = ["conv32"]  # in the first call: 100 epochs
# then, in the first call's time left or a second call: issue 39's best short row in full (100 epochs; on the CPU
# about 14 hours at 1 thread), the autoregressive model for as many of its 300 epochs as fit (a stopped run resumes
# in the next window), then the semi-supervised rows
MORE_RUNS = ["pixelcnn_flow_iaf_32x6_freebits16", "pixelcnn_gpu", "semi_supervised", "semi_supervised_conv"]
STEPS = ["cuda-tests", "bench", *FULL_RUNS, *MORE_RUNS]
OUT_OF_PLAN = ["best", "ablation_elbo_iwae_50", "hierarchical_iwae", "hierarchical_moonshot"]  # cannot fit a window
STEP_LIMITS = {"cuda-tests": 120, "bench": 120}  # seconds: the command is stopped there

# Planning estimates, in seconds: an H200's figures of 2026-11-28 (docs/gpu.md) with room for a slower card
# (the H200 took 23 s for the CUDA tests, 16 s for the bench, 0.4 s for a conv32 epoch, 8 s for its K = 1000
# evaluation, 0.3 s for a semi-supervised epoch). Once the bench has run, conv32's epoch comes from its
# measured captured step instead.
ESTIMATES = {"cuda-tests": 60, "bench": 70}  # the bench: 40 s in fp32 alone, and its bf16 sides
EPOCH_S = {"conv32": 0.6, "semi_supervised": 0.5, "semi_supervised_conv": 0.6,  # one epoch's training steps
           "pixelcnn_gpu": 1.8,  # a guess: the CPU step costs about 3x conv32's; not yet measured on a GPU
           "pixelcnn_flow_iaf_32x6_freebits16": 4.0}  # a guess: its CPU step is 8x conv32's (benchmarks/step_cost.py)
EPOCH_END_S = 0.3  # each epoch's test ELBO, pictures and checkpoint
EVAL_S = {"conv32": 20, "semi_supervised": 10, "semi_supervised_conv": 10,  # K = 1000 on 10,000 test images
          "pixelcnn_gpu": 60, "pixelcnn_flow_iaf_32x6_freebits16": 150}  # guesses: the decoder is 4x pixelcnn_gpu's
GUESS_EPOCH_S, GUESS_EVAL_S = 10.0, 60.0  # a row without an estimate of its own
STEPS_PER_EPOCH_128 = 60000 // 128

EVAL_K, EVAL_LIMIT, EVAL_ARGS = 1000, 0, ["--chunk", "500"]  # all 10,000 test images
TINY_EVAL_K, TINY_EVAL_LIMIT = 4, 16
TINY_CONFIG = {"epochs": 2, "train_size": 256, "test_size": 64, "batch_size": 32, "eval_batch_size": 64}
TINY_LABELS = 100

PART_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB
MAX_PARTS = 3  # with the five readable outputs, the 8 files a call may return
STATE_TAR = "campaign-state.tar"
OUTPUTS = ("campaign.log", "state.json", "results.csv", "evaluations.json", "bench.txt")
SETTLED = ("done", "failed", "stopped", "missing")  # a step's statuses that no call changes


@dataclasses.dataclass
class Budget:
    """The seconds this call may use, and what it keeps back to stop a run cleanly and pack up."""

    seconds: float
    pack: float = 15.0  # packing the state into OUT
    grace: float = 20.0  # a stopped trainer finishing its step (or an epoch's evaluation) and checkpointing
    started: float = dataclasses.field(default_factory=time.monotonic)
    attempted: int = 0  # steps started in this call

    def left(self) -> float:
        return self.started + self.seconds - time.monotonic()

    def deadline(self, for_training: bool = False) -> float:
        return self.started + self.seconds - self.pack - (self.grace if for_training else 0.0)

    def may_start(self, needs: float) -> bool:
        """A call's first step always starts (it has the whole budget); later ones only with `needs` seconds left."""
        return self.attempted == 0 or self.left() - self.pack >= needs


class Campaign:
    """The state of the campaign in its work folder, and the steps that move it on."""

    def __init__(self, work: Path, out: Path, device: str, tiny: bool, budget: Budget, epochs_per_call: int = 0):
        self.work, self.out, self.device, self.tiny, self.budget = work, out, device, tiny, budget
        self.epochs_per_call = epochs_per_call
        self.work.mkdir(parents=True, exist_ok=True)
        path = work / "state.json"
        self.state = json.loads(path.read_text()) if path.exists() else {"calls": 0, "steps": {}}

    # --- logging and subprocesses ---------------------------------------------------------------

    def log(self, message: str) -> None:
        line = f"[campaign {datetime.now(timezone.utc):%H:%M:%S}] {message}"
        print(line, flush=True)
        with open(self.work / "campaign.log", "a") as f:
            f.write(line + "\n")

    def command(self, args: list[str], deadline: float, copy_stdout: Path | None = None,
                stop_signal: int = signal.SIGTERM) -> tuple[int, bool]:
        """Run `python args` in the repository root, its output into the log, until it ends or the deadline
        passes: then stop_signal, and SIGKILL after the grace. Return (rc, stopped)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.log("$ python " + " ".join(args))
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace")
        lock = threading.Lock()
        copy = open(copy_stdout, "w") if copy_stdout else None

        def pump(stream, also=None):
            with open(self.work / "campaign.log", "a") as log:
                for line in stream:
                    with lock:
                        sys.stdout.write(line)
                        log.write(line)
                        log.flush()
                        if also:
                            also.write(line)

        readers = [threading.Thread(target=pump, args=(proc.stdout, copy)), threading.Thread(target=pump,
                                                                                              args=(proc.stderr,))]
        for reader in readers:
            reader.start()
        stopped = False
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                stopped = True
                self.log(f"stopping pid {proc.pid} ({signal.Signals(stop_signal).name}) at its budget")
                proc.send_signal(stop_signal)
                try:
                    proc.wait(timeout=self.budget.grace)
                except subprocess.TimeoutExpired:
                    self.log(f"pid {proc.pid} did not stop within {self.budget.grace:.0f} s: SIGKILL")
                    proc.kill()
                    proc.wait()
                break
            time.sleep(0.2)
        for reader in readers:
            reader.join()
        if copy:
            copy.close()
        return proc.returncode, stopped

    # --- the steps ------------------------------------------------------------------------------

    def step_state(self, name: str) -> dict:
        return self.state["steps"].setdefault(name, {"status": "pending"})

    def run_command_step(self, name: str, args: list[str], copy_stdout: Path | None = None) -> bool | None:
        """A step that is one command, not resumable, stopped at STEP_LIMITS[name]: settled when it ends or
        is stopped at its own limit; None if not started; False if the call ended first (it goes first next call)."""
        s = self.step_state(name)
        limit = STEP_LIMITS[name]
        if not self.budget.may_start(min(limit, ESTIMATES[name])):
            return None
        self.budget.attempted += 1
        started = time.monotonic()
        deadline = min(self.budget.deadline(), started + limit)
        rc, stopped = self.command(args, deadline, copy_stdout, stop_signal=signal.SIGINT)
        s["seconds"], s["rc"] = round(time.monotonic() - started, 1), rc
        if stopped and s["seconds"] < limit - 1:  # the call ran out, not the step's own budget
            s["attempts"] = s.get("attempts", 0) + 1
            if s["attempts"] < 2:
                self.log(f"{name}: out of time after {s['seconds']} s; it starts first in the next call")
                return False
            s["status"], s["error"] = "failed", f"did not finish within a call ({s['seconds']} s)"
        elif stopped:
            s["status"], s["error"] = "stopped", f"stopped at its budget of {limit} s; what ran is in campaign.log"
        else:
            s["status"] = "done" if rc == 0 else "failed"
            if rc:
                s["error"] = f"exit code {rc}; see campaign.log"
        self.log(f"{name}: {s['status']} in {s['seconds']} s (exit code {rc})")
        return True

    def cuda_tests(self) -> bool | None:
        return self.run_command_step("cuda-tests", CUDA_TESTS)

    def bench(self) -> bool | None:
        extra = BENCH_TINY_ARGS if self.tiny else BENCH_ARGS
        args = [*BENCH_COMMAND, "--device", self.device, *extra, "--json", str(self.work / "bench.json")]
        return self.run_command_step("bench", args, copy_stdout=self.work / "bench.txt")

    # --- the plan -------------------------------------------------------------------------------

    def epoch_seconds(self, name: str) -> tuple[float, str]:
        """One epoch of the experiment's full run on the GPU, and where that figure comes from."""
        measured = None
        if name == "conv32" and (self.work / "bench.json").exists():  # the default conv VAE at batch 128
            bench = json.loads((self.work / "bench.json").read_text())
            sides = next((t["sides"] for t in bench.get("training", []) if t["batch_size"] == 128), {})
            side = sides.get("project-graph") or sides.get("project")
            measured = side and side["ms_per_step"] * STEPS_PER_EPOCH_128 / 1000
        if measured:
            return measured + EPOCH_END_S, "from the bench"
        return EPOCH_S.get(name, GUESS_EPOCH_S) + EPOCH_END_S, "estimated"

    def plan(self, names: list[str]) -> list[tuple[str, float, str]]:
        """What is left of each step, in order: (what, estimated seconds, note)."""
        rows = []
        for name in names:
            s = self.step_state(name)
            if s["status"] in ("done", "failed", "stopped", "missing"):
                continue
            if name in ESTIMATES:
                rows.append((name, min(ESTIMATES[name], STEP_LIMITS[name]), f"stopped at {STEP_LIMITS[name]} s"))
                continue
            if not (runner.CONFIGS / f"{name}.toml").is_file():
                continue
            epochs = runner.experiment(name)["full"]["epochs"]
            if s["status"] in ("pending", "training"):
                done = 0 if s["status"] == "pending" else last_epoch(self.work / s.get("run", "none"))
                epoch_s, source = self.epoch_seconds(name)
                rows.append((f"{name} training", (epochs - done) * epoch_s,
                             f"{epochs - done} of {epochs} epochs, {epoch_s:.1f} s each ({source})"))
            rows.append((f"{name} evaluation", s.get("eval_needs", EVAL_S.get(name, GUESS_EVAL_S)),
                         f"log p(x) with K = {EVAL_K} on all 10,000 test images"))
        return rows

    def print_plan(self, names: list[str]) -> None:
        rows = self.plan(names)
        total, budget = sum(seconds for _, seconds, _ in rows), self.budget.seconds
        self.log(f"plan of call {self.state['calls']} ({'tiny sizes on the CPU; the estimates are those of the GPU' if self.tiny else 'GPU'}): "
                 f"a window is {WINDOW_S // 60} min of device time, a machine start costs {START_S[0]}-{START_S[1]} s "
                 f"of it, none starts with under {MIN_START_LEFT_S // 60} min left; this call's budget is "
                 f"{budget:.0f} s")
        elapsed = 0.0
        for what, seconds, note in rows:
            elapsed += seconds
            fits = "" if elapsed <= budget - self.budget.pack else "  (past this call's budget: the next call)"
            self.log(f"  {what:32s} {seconds:6.0f} s  {note}{fits}")
        self.log(f"  {'total':32s} {total:6.0f} s of {budget:.0f} s")
        after = WINDOW_S - START_S[1] - budget
        if self.state["calls"] == 1 and after > 60:
            self.log(f"  after this call the window has about {after:.0f} s left ({WINDOW_S} - {START_S[1]} for the "
                     f"start - {budget:.0f}): a second call with --budget {after - 60:.0f} if the device says so")
        elif after <= 0:
            self.log(f"  (a budget past what a window leaves after a start, {WINDOW_S - START_S[1]} s: not for a GPU window)")

    def experiment_config(self, name: str) -> Config:
        """The full version of experiment `name`, in this campaign's run folder (tiny: on tiny data)."""
        config = runner.experiment_config(name, True, self.work / "runs", self.device)
        config.out = str(self.work / "runs" / f"{name}-full")
        if self.tiny:
            config = dataclasses.replace(config, **{**TINY_CONFIG, "labels": min(config.labels, TINY_LABELS)})
        problems = config.errors()
        if problems:
            raise SystemExit(f"error: experiment {name}: " + "; ".join(problems))
        return config

    def experiment(self, name: str) -> bool | None:
        """Train (or resume), evaluate, add the row; True when the step is settled, False when out of time."""
        s = self.step_state(name)
        if not (runner.CONFIGS / f"{name}.toml").is_file():
            if s["status"] != "missing":
                self.log(f"{name}: no experiments/configs/{name}.toml yet; skipped (it runs once the config exists)")
            s["status"] = "missing"
            return True
        config = self.experiment_config(name)
        run_dir = Path(config.out)
        s["run"] = str(run_dir.relative_to(self.work))
        if s["status"] in ("pending", "missing", "training"):
            if not self.budget.may_start(0 if self.tiny else 30):
                return None
            self.budget.attempted += 1
            s["status"] = "training"
            if not self.train(name, config, s):
                return s["status"] == "failed"
            s["status"] = "evaluating"
        if s["status"] == "evaluating":
            needs = s.get("eval_needs", 0 if self.tiny else EVAL_S.get(name, GUESS_EVAL_S))
            if not self.budget.may_start(needs):
                self.log(f"{name}: evaluation needs about {needs:.0f} s; it starts first in the next call")
                return False
            self.budget.attempted += 1
            if not self.evaluate(name, run_dir, s):
                return s["status"] == "failed"
            self.record(name, run_dir, s)
        return True

    def train(self, name: str, config: Config, s: dict) -> bool:
        """Train until the run is finished (True) or the call's time is up (False)."""
        run_dir = Path(config.out)
        if finished(run_dir):
            return True
        if (run_dir / CHECKPOINT_NAME).exists():
            args = ["-m", "pyro_vae.train", "--resume", str(run_dir)]
        else:  # a run killed before its first checkpoint starts again
            args = ["-m", "pyro_vae.train", *train_flags(config), "--overwrite"]
        if self.epochs_per_call:  # the trainer stops itself, checkpointed, after these epochs (exit code 0)
            args += ["--stop-after", str(self.epochs_per_call)]
        started = time.monotonic()
        rc, stopped = self.command(args, self.budget.deadline(for_training=True))
        s["train_seconds"] = round(s.get("train_seconds", 0.0) + time.monotonic() - started, 1)
        if finished(run_dir):
            self.log(f"{name}: training finished ({s['train_seconds'] / 60:.1f} min in all)")
            return True
        if stopped or rc in (0, 128 + signal.SIGTERM):  # 0 unfinished: stopped by --stop-after
            self.log(f"{name}: training paused at {progress(run_dir)}; the next call resumes it")
        else:
            s["status"], s["error"] = "failed", f"training exited with code {rc}; see campaign.log"
            self.log(f"{name}: {s['error']}")
        return False

    def evaluate(self, name: str, run_dir: Path, s: dict) -> bool:
        k, limit = (TINY_EVAL_K, TINY_EVAL_LIMIT) if self.tiny else (EVAL_K, EVAL_LIMIT)
        args = ["-m", "pyro_vae.evaluate", str(run_dir), "--k", str(k), "--limit", str(limit),
                "--device", self.device, "--out", str(run_dir / "evaluation.json"), *([] if self.tiny else EVAL_ARGS)]
        started = time.monotonic()
        rc, stopped = self.command(args, self.budget.deadline())
        seconds = time.monotonic() - started
        if stopped:
            if seconds > 0.8 * self.budget.seconds:
                s["status"], s["error"] = "failed", f"evaluation did not fit one call ({seconds:.0f} s)"
            else:
                s["eval_needs"] = round(max(s.get("eval_needs", 0), 1.25 * seconds), 1)
                self.log(f"{name}: evaluation out of time after {seconds:.0f} s; it starts first in the next call")
            return False
        if rc:
            s["status"], s["error"] = "failed", f"evaluation exited with code {rc}; see campaign.log"
            self.log(f"{name}: {s['error']}")
            return False
        s["eval_seconds"] = round(seconds, 1)
        return True

    def record(self, name: str, run_dir: Path, s: dict) -> None:
        """The run's results row (as experiments/run.py writes it) into this campaign's results.csv."""
        figures = json.loads((run_dir / "evaluation.json").read_text())
        trained = load(run_dir, device=self.device)
        self.digit_classifier(trained.config)
        row = runner.results_row(name, True, run_dir, trained, figures, s.get("train_seconds", 0.0) / 60,
                                 runner._commit())
        runner.append_row(row, self.work / "results.csv")
        s["status"] = "done"
        self.log(f"{name}: done: " + ", ".join(f"{key} {row[key]}" for key in runner.COLUMNS[3:11]))

    def digit_classifier(self, config: Config) -> None:
        """The CVAE rows' independent classifier, trained once on this device and kept in the work folder."""
        digit_classifier.CACHE = self.work / "digit_classifier.pt"
        if not config.conditional or digit_classifier.CACHE.exists():
            return
        sizes = {"epochs": 1, "train_size": 512} if self.tiny else {}
        net, accuracy = digit_classifier.train_classifier(config.data_dir, device=self.device, **sizes)
        self.log(f"digit classifier trained: test accuracy {accuracy:.4f}")
        torch.save(net.cpu().state_dict(), digit_classifier.CACHE)

    # --- one call -------------------------------------------------------------------------------

    def call(self, only: list[str] | None = None) -> None:
        self.state["calls"] += 1
        self.log(f"call {self.state['calls']}: device {self.device}, budget {self.budget.seconds:.0f} s"
                 + (", tiny" if self.tiny else ""))
        self.print_plan(only or STEPS)
        actions = {"cuda-tests": self.cuda_tests, "bench": self.bench}
        for name in only or STEPS:
            s = self.step_state(name)
            if s["status"] in SETTLED:
                continue
            try:
                outcome = actions[name]() if name in actions else self.experiment(name)
            except (Exception, SystemExit) as e:  # a broken step must not stop the others, call after call
                s["status"], s["error"] = "failed", f"{type(e).__name__}: {e}"
                self.log(f"{name}: failed:\n{traceback.format_exc()}")
                outcome = True
            self.publish()
            if outcome is None:
                self.log(f"{self.budget.left():.0f} s left: {name} and what follows wait for the next call")
                break
            if outcome is False:
                break
        for name in only or STEPS:
            s = self.step_state(name)
            self.log(f"  {name:22s} {s['status']}" + (f" ({s['error']})" if s.get("error") else ""))
        left = [n for n in only or STEPS if self.step_state(n)["status"] not in SETTLED]
        if left:
            needs = sum(seconds for _, seconds, _ in self.plan(left))
            self.log(f"campaign: left: {', '.join(left)} (about {needs:.0f} s). Call again only if the window has "
                     f"time left: with the device's budget_left_s, --budget (budget_left_s - 60)")
        else:
            self.log("campaign: every step is settled")
        self.publish()

    def publish(self) -> None:
        """Save the state and put what the next call needs, and the readable figures, into OUT."""
        (self.work / "state.json").write_text(json.dumps(self.state, indent=2) + "\n")
        self.out.mkdir(parents=True, exist_ok=True)
        for old in self.out.glob(f"{STATE_TAR}.*"):
            old.unlink()
        for name in OUTPUTS:
            if (self.work / name).exists():
                shutil.copyfile(self.work / name, self.out / name)
        evaluations = {name: json.loads((self.work / s["run"] / "evaluation.json").read_text())
                       for name, s in self.state["steps"].items()
                       if s.get("run") and (self.work / s["run"] / "evaluation.json").exists()}
        (self.out / "evaluations.json").write_text(json.dumps(evaluations, indent=2) + "\n")
        for keep_best in (True, False):
            members = self.members(keep_best)
            size = sum(path.stat().st_size for path in members) + 1024 * (len(members) + 2)
            if size <= MAX_PARTS * PART_BYTES:
                break
            self.log(f"the state is {size / 2**20:.0f} MiB: leaving out {BEST_NAME} of the runs in progress")
        pack(self.work, members, self.out / STATE_TAR)

    def members(self, keep_best: bool) -> list[Path]:
        """The files of the work folder the next call needs: checkpoints only of runs still in progress,
        pictures only of each run's last epoch."""
        runs = {self.work / s["run"]: s["status"] not in SETTLED
                for s in self.state["steps"].values() if s.get("run")}  # run folder: still in progress?
        chosen = []
        for path in sorted(self.work.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            run = next((r for r in runs if r in path.parents), None)
            if run is not None:
                if path.suffix == ".pt" and (not runs[run] or (path.name == BEST_NAME and not keep_best)):
                    continue
                if path.parent.name == "images" and not path.stem.endswith(f"_{last_epoch(run):03d}"):
                    continue
            chosen.append(path)
        return chosen


def finished(run_dir: Path) -> bool:
    """Whether the run's checkpoint is at its last epoch (or step cap)."""
    try:
        state = read_checkpoint(run_dir)
    except CheckpointError:
        return False
    config = state["config"]
    return state.get("plan") is None and (state["epoch"] >= config["epochs"]
                                          or bool(config["max_steps"]) and state["step"] >= config["max_steps"])


def progress(run_dir: Path) -> str:
    try:
        state = read_checkpoint(run_dir)
    except CheckpointError:
        return "no checkpoint yet"
    return f"epoch {state['epoch']}/{state['config']['epochs']}, step {state['step']}"


def last_epoch(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def train_flags(config: Config) -> list[str]:
    """`python -m pyro_vae.train` flags that give this config (the device always named)."""
    default, flags = Config(), []
    for f in dataclasses.fields(Config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if value == getattr(default, f.name) and f.name != "device":
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def pack(work: Path, members: list[Path], prefix: Path) -> list[Path]:
    """One tar of members (paths inside work), cut into numbered parts of at most PART_BYTES."""
    whole = prefix.with_name(prefix.name + ".whole")
    with tarfile.open(whole, "w") as tar:
        for path in members:
            tar.add(path, arcname=str(path.relative_to(work)))
    parts = []
    with open(whole, "rb") as f:
        while chunk := f.read(PART_BYTES):
            parts.append(prefix.with_name(f"{prefix.name}.{len(parts)}"))
            parts[-1].write_bytes(chunk)
    whole.unlink()
    return parts


def restore(state_dir: Path, work: Path) -> bool:
    """Unpack the state carried in state_dir (a copy of an earlier OUT) into work, if it is newer; True if so."""
    carried = state_dir / "state.json"
    parts = sorted((p for p in state_dir.glob(f"{STATE_TAR}.*") if p.suffix[1:].isdigit()),
                   key=lambda p: int(p.suffix[1:]))
    if not carried.exists() or not parts:
        return False
    mine = work / "state.json"
    if mine.exists() and json.loads(mine.read_text())["calls"] >= json.loads(carried.read_text())["calls"]:
        return False  # this machine's own work folder is as new (a warm machine)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    whole = work / f".{STATE_TAR}"
    with open(whole, "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    with tarfile.open(whole) as tar:
        tar.extractall(work, filter="data")
    whole.unlink()
    return True


def collect(returned: Path, state_dir: Path) -> int:
    """Here, after a call: keep what it returned as the state for the next one; add its new rows to results.csv."""
    if not (returned / "state.json").is_file():
        print(f"error: {returned} holds no state.json: not what a campaign call returned", file=sys.stderr)
        return 1
    if returned.resolve() != state_dir.resolve():
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.copytree(returned, state_dir)
    rows = list(csv.DictReader(open(returned / "results.csv"))) if (returned / "results.csv").exists() else []
    known = list(csv.DictReader(open(runner.RESULTS))) if runner.RESULTS.exists() else []
    same = ("experiment", "version", "epochs", "device", "test_elbo", "log_px", "k", "date")
    seen = {tuple(r[c] for c in same) for r in known}
    added = 0
    for row in rows:
        if tuple(row[c] for c in same) in seen:
            continue
        row["commit"] = row["commit"] or runner._commit()  # the device's copy has no git: the checkout it was
        runner.append_row(row, runner.RESULTS)
        added += 1
    if added:
        runner.write_table()
    state = json.loads((returned / "state.json").read_text())
    print(f"campaign: state of call {state['calls']} kept in {state_dir}; {added} new row(s) added to "
          f"{runner.RESULTS}" + (" and the table in docs/results.md" if added else ""))
    for name, s in state["steps"].items():
        print(f"  {name:22s} {s['status']}" + (f" ({s['error']})" if s.get("error") else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python experiments/campaign.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"),
                        help="where the outputs and the packed state go (default: $OUT)")
    parser.add_argument("--state", type=Path, default=ROOT / ".campaign",
                        help="the outputs of the previous call, carried back (default: .campaign)")
    parser.add_argument("--work", type=Path, default=None,
                        help="the work folder (default: runs/campaign, or runs/campaign-tiny with --tiny)")
    parser.add_argument("--budget", type=float, default=FIRST_CALL_S,
                        help="seconds this call may use (a second call: the window's time left less a minute)")
    parser.add_argument("--plan", action="store_true", help="print this call's plan and exit")
    parser.add_argument("--tiny", action="store_true",
                        help="every step with tiny sizes on the CPU: checks the campaign, measures nothing")
    parser.add_argument("--only", nargs="+", choices=STEPS + OUT_OF_PLAN, metavar="STEP",
                        help=f"run only these steps, in this order (of: {', '.join(STEPS)}; or a row out of the "
                             f"plan: {', '.join(OUT_OF_PLAN)})")
    parser.add_argument("--redo", nargs="+", choices=STEPS + OUT_OF_PLAN, default=[], metavar="STEP",
                        help="forget these steps' results (and runs) and do them again")
    parser.add_argument("--epochs-per-call", type=int, default=0,
                        help="stop each training run after this many epochs in a call, checkpointed (0: no cap)")
    parser.add_argument("--collect", type=Path, metavar="DIR",
                        help="here, after a call: keep DIR (the call's returned files) as --state and add its "
                             "new rows to experiments/results.csv")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.collect:
        return collect(args.collect, args.state)
    if args.budget <= 0 or args.epochs_per_call < 0:
        parser.error("--budget must be positive and --epochs-per-call at least 0")
    if args.plan:  # anywhere, GPU or not: the plan from the carried state, in a scratch folder
        scratch = Path(tempfile.mkdtemp())
        if (args.state / "state.json").is_file():
            shutil.copyfile(args.state / "state.json", scratch / "state.json")
        budget = Budget(args.budget, pack=0.0) if args.tiny else Budget(args.budget)
        campaign = Campaign(scratch, scratch, "cuda", args.tiny, budget)
        campaign.state["calls"] += 1
        campaign.print_plan(args.only or STEPS)
        shutil.rmtree(scratch)
        return 0
    if args.out is None:
        parser.error("--out is needed where $OUT is not set")
    if args.tiny:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("error: no CUDA device here; the campaign is for a GPU (--tiny runs it on the CPU)", file=sys.stderr)
        return 1
    work = args.work or ROOT / "runs" / ("campaign-tiny" if args.tiny else "campaign")
    restored = restore(args.state, work)
    budget = Budget(args.budget, pack=0.0, grace=30.0) if args.tiny else Budget(args.budget)
    campaign = Campaign(work, args.out, device, args.tiny, budget, args.epochs_per_call)
    if restored:
        campaign.log(f"restored the state of call {campaign.state['calls']} from {args.state}")
    for name in args.redo:
        s = campaign.state["steps"].pop(name, {})
        if s.get("run"):
            shutil.rmtree(work / s["run"], ignore_errors=True)
        campaign.log(f"{name}: forgotten, to be done again")
    campaign.call(args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
