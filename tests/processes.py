"""Processes that tests start, ended with every process they started in turn, however the test ends.

Each start gets a variable of its own in the environment, which its children inherit: torchrun's ranks too,
though torchrun puts each in a session of its own, out of reach of a signal to its process group. Ending
finds them all by that variable in /proc: SIGTERM, then SIGKILL after GRACE_S for those still there (a rank
blocked in a gloo collective never runs its SIGTERM handler). A process without the variable is never signalled.

    with processes.started(argv, timeout=120, stdout=subprocess.PIPE, text=True) as proc:  # a Popen
        ...  # ended when the block ends; past the timeout, ended early and TimeoutExpired raised
    done = processes.run(argv, timeout=300, cwd=ROOT)  # subprocess.run(..., capture_output=True, text=True)
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

GRACE_S = 3.0  # after SIGTERM, before SIGKILL
KILL_WAIT_S = 30.0  # for SIGKILLed processes to go; a process still there then is an error
PREFIX = f"PYRO_VAE_TEST_PROCESS_{os.getpid()}_"  # of the variable: this pytest's starts only
_numbers = itertools.count()


def _carries(pid: int, marker: bytes) -> bool:
    """Whether the process's environment has a variable that starts with marker (a zombie's has none)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(entry.startswith(marker) for entry in f.read().split(b"\0"))
    except OSError:  # ended, or not readable
        return False


def _signal(marker: bytes, signum: int) -> bool:
    """Send signum (0: none, only look) to every live process that carries marker; whether there were any."""
    found = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _carries(int(entry), marker):
            continue
        try:
            handle = os.pidfd_open(int(entry))
        except OSError:  # ended in between
            continue
        try:
            if _carries(int(entry), marker):  # checked again through the handle: no other process reusing the id
                signal.pidfd_send_signal(handle, signum)
                found = True
        except ProcessLookupError:
            pass
        finally:
            os.close(handle)
    return found


def end(marker: bytes) -> None:
    """End every process that carries marker: SIGTERM, SIGKILL after GRACE_S, then wait until none is left."""
    if not _signal(marker, signal.SIGTERM):
        return
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and _signal(marker, 0):
        time.sleep(0.05)
    deadline = time.monotonic() + KILL_WAIT_S
    while _signal(marker, signal.SIGKILL):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes that carry {marker.decode()} outlived SIGKILL for {KILL_WAIT_S:.0f} s")
        time.sleep(0.05)


def end_all() -> None:
    """End every process that this pytest started here and that is still there."""
    end(PREFIX.encode())


@contextmanager
def _signals_deferred():
    """Ctrl-C held back (in the main thread) while the block runs, then raised: it cannot cut an ending short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


class Started(subprocess.Popen):
    """A Popen whose process, and every process it starts, carries a variable of its own."""

    def __init__(self, args, *, env=None, **kwargs):
        self.marker = f"{PREFIX}{next(_numbers)}".encode()
        super().__init__(args, env={**(os.environ if env is None else env), self.marker.decode(): "1"}, **kwargs)

    def end(self) -> None:
        """End it and all it started, and collect its exit status."""
        with _signals_deferred():
            end(self.marker + b"=")
            self.wait()


@contextmanager
def started(args, *, timeout: float | None, **kwargs):
    """subprocess.Popen(args, **kwargs) for the block, ended with all it started when the block ends, however it
    ends; after timeout seconds ended early, and the block raises subprocess.TimeoutExpired."""
    proc = Started(args, **kwargs)
    expired = threading.Event()

    def expire():
        expired.set()
        proc.end()

    watchdog = threading.Timer(timeout, expire) if timeout is not None else None
    if watchdog:
        watchdog.daemon = True
        watchdog.start()
    error = None
    with proc:  # closes its pipes at the end
        try:
            yield proc
        except Exception as e:  # noqa: BLE001 (raised below, once everything is ended)
            error = e
        finally:  # KeyboardInterrupt too
            if watchdog:
                watchdog.cancel()
                watchdog.join()
            proc.end()
    if expired.is_set():
        raise subprocess.TimeoutExpired(proc.args, timeout) from error
    if error is not None:
        raise error


def run(args, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs), with everything it
    started ended before it returns or raises."""
    with started(args, timeout=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.end()
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
