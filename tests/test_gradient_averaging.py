"""Under torchrun the ranks average their gradients: 2 gloo processes on the CPU, the trainer's own SVIStep.

Each rank steps its shard of every global batch with the real plate scale (N / (B / 2)); the test gives
both ranks, and then one process on the whole global batch, the same draws of z (the guide's standard
normal noise, replayed from a fixed tensor) and the same binarized images. Then the gradient Adam gets on
each rank must be the one-process gradient of the global batch, step after step, and the ranks must
hold identical parameters. A second test stops one rank with a signal that lands after a step's
all-reduce: every rank must stop after the same, next, step.
"""

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from torch.distributions import normal

import processes
from pyro_vae import Config, build_vae
from pyro_vae.checkpoint import read_checkpoint
from pyro_vae.data import load_mnist
from pyro_vae.train import SVIStep

ROOT = Path(__file__).resolve().parent.parent
NUM_DATA, BATCH, STEPS = 1000, 8, 3  # the global batch of 8 is 4 images per rank: plate scales 125 and 250
CASES = {"trace": {}, "iwae": {"elbo": "iwae", "num_particles": 3}}

# Shared by the ranks and the one process: the guide's noise comes from a given list, one tensor per step,
# each rank taking its slice of the batch dimension (the last but one: the latent is the last).
_REPLAY = '''
import torch
from torch.distributions import normal

def replay_noise(draws, rank, world):
    """Make Normal.rsample use draws[0], draws[1], ... (this rank's shard of each) instead of fresh noise."""
    draws = iter(draws)

    def standard_normal(shape, dtype, device):
        eps = next(draws).chunk(world, dim=-2)[rank]
        assert eps.shape == shape, (eps.shape, shape)
        return eps.to(dtype=dtype, device=device)

    normal._standard_normal = standard_normal


def record_gradients(step, vae):
    """The gradients Adam receives at each step, by parameter name."""
    seen, real = [], step.optimizer.step

    def recording(*args, **kwargs):
        seen.append({n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None})
        return real(*args, **kwargs)

    step.optimizer.step = recording
    return seen
'''

# One rank: the trainer's SVIStep, with the Ranks and stop flag the training loop gives it.
_RANK_PROGRAM = '''
import sys, types, torch, pyro
from torch.distributions import normal
sys.path.insert(0, sys.argv[3])
from replay import record_gradients, replay_noise
from pyro_vae import build_vae, distributed
from pyro_vae.train import SVIStep
given = torch.load(sys.argv[1], weights_only=False)  # written by the test itself
ranks = distributed.setup("cpu")
results, fresh_noise = {}, normal._standard_normal
for name, case in given["cases"].items():
    normal._standard_normal = fresh_noise
    pyro.clear_param_store()
    vae = build_vae(case["config"], num_data=given["num_data"])
    vae.load_state_dict(case["state"])
    step = SVIStep(vae, case["config"], ranks, stop=types.SimpleNamespace(signum=None))
    gradients = record_gradients(step, vae)
    replay_noise(case["noise"], ranks.rank, ranks.world)
    losses = [float(step.step(x.chunk(ranks.world)[ranks.rank])) for x in given["batches"]]
    results[name] = {"gradients": gradients, "state": vae.state_dict(), "losses": losses}
torch.save(results, f"{sys.argv[2]}.{ranks.rank}")
distributed.teardown(ranks)
'''


def _torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return processes.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *map(str, args)], cwd=ROOT, timeout=timeout, env=env)


def _config(**changes) -> Config:
    return Config(latent_dim=4, conv_channels=(8, 16), device="cpu", **changes)


@pytest.mark.slow  # two gloo processes: about 30 s on a loaded 2-core machine
def test_each_ranks_gradient_is_the_one_process_gradient_of_the_global_batch(data_dir, tmp_path, monkeypatch):
    images = load_mnist(data_dir, binarize="threshold", train_size=1, test_size=BATCH * STEPS).test_images
    batches = list(images.split(BATCH))  # binarized once: the same images for the ranks and the one process
    cases = {}
    for name, changes in CASES.items():
        config = _config(**changes)
        torch.manual_seed(1)
        particles = (config.num_particles,) if config.elbo == "iwae" else ()
        cases[name] = {"config": config, "state": build_vae(config, num_data=NUM_DATA).state_dict(),
                       "noise": [torch.randn(*particles, BATCH, config.latent_dim) for _ in range(STEPS)]}
    torch.save({"cases": cases, "batches": batches, "num_data": NUM_DATA}, tmp_path / "given.pt")
    (tmp_path / "replay.py").write_text(_REPLAY)
    (tmp_path / "rank.py").write_text(_RANK_PROGRAM)
    ran = _torchrun(tmp_path / "rank.py", tmp_path / "given.pt", tmp_path / "out", tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]

    monkeypatch.syspath_prepend(str(tmp_path))
    from replay import record_gradients, replay_noise
    monkeypatch.setattr(normal, "_standard_normal", normal._standard_normal)  # restored after the test
    for name, case in cases.items():
        # the rank's steps: same parameters on both ranks, bit for bit
        for key, value in ranks[0][name]["state"].items():
            assert torch.equal(value, ranks[1][name]["state"][key]), (name, key)
        # one process, the whole global batch, the same noise: the gradients of each step
        pyro.clear_param_store()
        vae = build_vae(case["config"], num_data=NUM_DATA)
        vae.load_state_dict(case["state"])
        step = SVIStep(vae, case["config"])
        expected = record_gradients(step, vae)
        replay_noise(case["noise"], 0, 1)
        losses = [float(step.step(x)) for x in batches]
        for t in range(STEPS):
            for rank in ranks:
                got = rank[name]["gradients"][t]
                assert got.keys() == expected[t].keys()
                for key, want in expected[t].items():
                    torch.testing.assert_close(got[key], want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                               msg=f"{name}, step {t + 1}, {key}")
            # and the loss the trainer reports (the ranks' mean) is the global batch's
            assert ranks[0][name]["losses"][t] == pytest.approx(losses[t], rel=1e-5), (name, t)
        for key, value in vae.state_dict().items():
            torch.testing.assert_close(ranks[0][name]["state"][key], value, rtol=1e-4, atol=1e-6, msg=(name, key))


# A rank of `python -m pyro_vae.train` whose rank 0 gets SIGTERM just after step SIGNAL_AT returned (its
# all-reduce done): rank 1 knows nothing of it until the next step's all-reduce.
SIGNAL_AT = 5
_SIGNAL_PROGRAM = f'''
import os, signal, sys
from pyro_vae import train
real_step, count = train.SVIStep.step, {{"n": 0}}

def step_then_signal(self, *args, **kwargs):
    loss = real_step(self, *args, **kwargs)
    count["n"] += 1
    if count["n"] == {SIGNAL_AT} and os.environ["RANK"] == "0":
        signal.raise_signal(signal.SIGTERM)
    return loss

train.SVIStep.step = step_then_signal
sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.slow  # two gloo processes: about 20 s on a loaded 2-core machine
def test_a_signal_after_a_steps_all_reduce_stops_every_rank_after_the_next_step(data_dir, tmp_path):
    (tmp_path / "signalled.py").write_text(_SIGNAL_PROGRAM)
    run = tmp_path / "run"
    try:
        ran = _torchrun(tmp_path / "signalled.py", "--epochs", "1", "--train-size", "512", "--test-size", "64",
                        "--batch-size", "32", "--latent-dim", "2", "--conv-channels", "4", "8",
                        "--data-dir", data_dir, "--device", "cpu", "--out", run, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks did not stop together: one waits in a collective the other never joins")
    assert ran.stderr.count("pyro_vae: SIGTERM: stopped and saved") == 2, ran.stderr[-3000:]  # each rank's line
    state = read_checkpoint(run)
    assert state["epoch"] == 0 and state["position"] == SIGNAL_AT + 1 and state["step"] == SIGNAL_AT + 1
    assert len(state["rng"]) == 2  # both ranks reached the checkpoint's gather
