"""tests/processes.py: what a test starts is ended with all it started, and nothing else is touched."""

import os
import subprocess
import sys

import pytest

import processes

# A parent that starts a child in a session of its own (as torchrun starts its ranks), which ignores SIGTERM
# (as a rank blocked in gloo does), says the child's process id and waits
PARENT = """
import subprocess, sys, time
ignores = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
           "time.sleep(600)")
child = subprocess.Popen([sys.executable, "-c", ignores], start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)  # holds none of the test's pipes
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # other processes
def test_a_timeout_or_a_failure_ends_the_whole_tree_and_nothing_else(monkeypatch):
    monkeypatch.setattr(processes, "GRACE_S", 0.5)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as bystander:  # not the helper's
        try:
            with pytest.raises(subprocess.TimeoutExpired) as info:
                processes.run([sys.executable, "-c", PARENT], timeout=10)
            # the parent printed its child's id before the timeout (it is in the output the exception keeps)
            child = int(info.value.stdout.split()[0])
            assert not _alive(child)

            with pytest.raises(AssertionError, match="a test that fails"):
                with processes.started([sys.executable, "-c", PARENT], timeout=60, stdout=subprocess.PIPE,
                                       text=True) as proc:
                    child = int(proc.stdout.readline())
                    assert _alive(child)
                    raise AssertionError("a test that fails")
            assert not _alive(child) and proc.returncode is not None

            with pytest.raises(subprocess.TimeoutExpired):
                with processes.started([sys.executable, "-c", PARENT], timeout=10, stdout=subprocess.PIPE,
                                       text=True) as proc:
                    child = int(proc.stdout.readline())
                    proc.wait()  # would wait 600 s: the timeout ends it
            assert not _alive(child)
            assert bystander.poll() is None  # never signalled
        finally:
            bystander.kill()
            processes.end_all()  # what a broken ending left (the session's own safety net, sooner)
