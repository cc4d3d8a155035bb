"""`python -m pyro_vae.train` that stops before one SVI step and says so, for tests that act at a known step.

    python tests/train_at_step.py STEP WAIT [train flags ...]    # also as torchrun's script

Before step STEP (1-based, counted in this process) runs, the process prints "at step STEP" and waits:
  signal         until a signal has reached the trainer (its stop flag is set); the step then runs, and the
                 trainer stops after it, as after any signal: the checkpoint's position is STEP.
  second-signal  the same, then prints "first signal" and waits for a second one (which stops at once).
  stdin          until a line arrives on stdin.
  memory         limits the address space to what the process uses now plus 64 MiB, then runs on: the
                 step's larger allocations fail as on a machine out of memory.
Under torchrun only rank 0 waits (the others wait for it in the step's all-reduce). A test that never
acts fails on a 120 s deadline instead of hanging. Everything else is the trainer's own command line.
"""

import os
import resource
import sys
import time

from pyro_vae import train as trainer

DEADLINE_S = 120


def _wait(stop, how: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    if how == "stdin":
        sys.stdin.readline()
        return
    if how == "memory":
        with open("/proc/self/statm") as f:
            in_use = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (in_use + (64 << 20), resource.RLIM_INFINITY))
        return
    while stop.signum is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if how == "second-signal":
        print("first signal", flush=True)
        while time.monotonic() < deadline:  # the second signal raises KeyboardInterrupt in here
            time.sleep(0.01)


def main() -> int:
    at, how, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    waits = os.environ.get("RANK", "0") == "0"
    real_step, count = trainer.SVIStep.step, [0]

    def step(self, *args, **kwargs):
        count[0] += 1
        if count[0] == at and waits:
            print(f"at step {at}", flush=True)
            _wait(self.stop, how)
        return real_step(self, *args, **kwargs)

    trainer.SVIStep.step = step
    return trainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
