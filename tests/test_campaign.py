"""The GPU campaign (experiments/campaign.py), checked on the CPU with --tiny: layout, packing, resuming, collecting."""

import csv
import json
import re
from pathlib import Path

import pytest

import processes
from pyro_vae.config import parse_command_line

@pytest.fixture
def campaign(experiment_script, monkeypatch):
    """experiments/campaign.py, whose commands are started as tests/processes.py starts them and ended with the test."""
    module = experiment_script("campaign")
    monkeypatch.setattr(module.subprocess, "Popen", processes.Started)
    yield module
    processes.end_all()


def _returned_files(out: Path) -> list[Path]:
    """What the device tool would bring back: every file, each checked against its limits."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    for path in files:
        assert path.stat().st_size <= 16 * 2**20 and re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path
        assert len(path.relative_to(out).parts) <= 3, path
    return files


@pytest.mark.parametrize("name", ["conv32", "best", "pixelcnn_gpu", "semi_supervised", "semi_supervised_conv"])
@pytest.mark.parametrize("tiny", [False, True])
def test_the_trainer_flags_give_back_each_experiments_config(campaign, name, tiny, tmp_path):
    """A run starts as `python -m pyro_vae.train FLAGS`: the flags must parse to exactly the experiment's config."""
    runs = campaign.Campaign(tmp_path, tmp_path / "out", "cpu", tiny, campaign.Budget(10))
    config = runs.experiment_config(name)
    parsed, options = parse_command_line(campaign.train_flags(config))
    assert parsed == config and not options.resume
    assert config.epochs == (2 if tiny else campaign.runner.experiment(name)["full"]["epochs"])
    assert config.device == "cpu" and config.out == str(tmp_path / "runs" / f"{name}-full")


def test_the_state_packs_into_parts_that_unpack_to_the_same_files(campaign, tmp_path, monkeypatch):
    monkeypatch.setattr(campaign, "PART_BYTES", 8192)
    work, out = tmp_path / "work", tmp_path / "out"
    runs = campaign.Campaign(work, out, "cpu", True, campaign.Budget(10))
    run = work / "runs" / "conv32-full"
    (run / "images").mkdir(parents=True)
    for name, size in [("checkpoint.pt", 6000), ("best.pt", 6000), ("metrics.jsonl", 10),
                       ("images/samples_001.png", 5), ("images/samples_002.png", 5)]:
        (run / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    (run / "metrics.jsonl").write_text("{}\n{}\n")  # two epochs: only the pictures of epoch 2 travel
    runs.state["steps"]["conv32"] = {"status": "training", "run": "runs/conv32-full"}
    runs.state["calls"] = 3
    runs.publish()
    parts = sorted(out.glob("campaign-state.tar.*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 8192 for p in parts)
    _returned_files(out)

    again = tmp_path / "again"
    assert campaign.restore(out, again)
    for name in ("checkpoint.pt", "best.pt", "metrics.jsonl", "images/samples_002.png"):
        assert (again / "runs/conv32-full" / name).read_bytes() == (run / name).read_bytes(), name
    assert not (again / "runs/conv32-full/images/samples_001.png").exists()
    assert json.loads((again / "state.json").read_text())["calls"] == 3
    assert not campaign.restore(out, again)  # not newer than the work folder it would replace

    runs.state["steps"]["conv32"]["status"] = "done"  # a finished run's checkpoints stay behind
    runs.publish()
    assert campaign.restore(out, tmp_path / "third")
    assert not list((tmp_path / "third").rglob("*.pt")) and (tmp_path / "third/runs/conv32-full/metrics.jsonl").exists()


def test_collect_keeps_the_state_and_adds_each_new_row_once(campaign, tmp_path, monkeypatch):
    runner = campaign.runner
    readme = tmp_path / "results.md"
    readme.write_text(f"intro\n{runner.TABLE_START}\nold\n{runner.TABLE_END}\n")
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results.csv")
    monkeypatch.setattr(runner, "RESULTS_PAGE", readme)
    monkeypatch.setattr(runner, "_commit", lambda: "abc1234")
    returned = tmp_path / "returned"
    returned.mkdir()
    (returned / "state.json").write_text(json.dumps({"calls": 2, "steps": {"conv32": {"status": "done"}}}))
    row = {column: "1" for column in runner.COLUMNS} | {"experiment": "conv32", "version": "full", "commit": ""}
    runner.append_row(row, returned / "results.csv")
    state = tmp_path / "state"
    for _ in range(2):
        assert campaign.main(["--collect", str(returned), "--state", str(state)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 1 and rows[0]["commit"] == "abc1234"  # the device's copy had no git: the checkout's
    assert (state / "state.json").exists() and "| conv32 | full |" in readme.read_text()


def test_the_tiny_dry_run_prints_the_plan_of_a_15_minute_window(campaign, tmp_path, capsys):
    """One start, then a first call of 8 minutes: the CUDA tests (stopped at 2 min), the bench (2 min), conv32 in
    full with K = 1000 on all test images, all within its budget by the estimates; rows that cannot fit a window
    are not in the plan."""
    assert campaign.main(["--tiny", "--plan", "--state", str(tmp_path / "nothing")]) == 0
    printed = capsys.readouterr().out
    assert "a window is 15 min of device time" in printed and "none starts with under 4 min left" in printed
    assert "this call's budget is 480 s" in printed and "a second call with --budget" in printed
    runs = campaign.Campaign(tmp_path / "work", tmp_path / "out", "cpu", True, campaign.Budget(campaign.FIRST_CALL_S))
    plan = runs.plan(campaign.STEPS)
    for what, seconds, note in plan:  # each row printed with its estimate
        assert re.search(rf"{re.escape(what)} +{seconds:.0f} s  {re.escape(note)}", printed), what
    first_call = plan[:4]
    assert [what for what, _, _ in first_call] == ["cuda-tests", "bench", "conv32 training", "conv32 evaluation"]
    notes = {what: note for what, _, note in plan}
    assert notes["cuda-tests"] == "stopped at 120 s" and notes["bench"] == "stopped at 120 s"
    assert notes["conv32 training"].startswith("100 of 100 epochs") and "K = 1000 on all 10,000" in notes[
        "conv32 evaluation"]
    assert sum(seconds for _, seconds, _ in first_call) <= campaign.FIRST_CALL_S - runs.budget.pack
    for out_of_plan in ("best", "hierarchical_iwae", "hierarchical_moonshot", "ablation_elbo_iwae_50"):
        assert out_of_plan not in campaign.STEPS and out_of_plan not in printed


def test_a_command_step_is_stopped_cleanly_at_its_budget_and_the_next_one_runs(campaign, tmp_path, monkeypatch):
    """The bench (here a stand-in command that would run for a minute) gets SIGINT at its limit and is settled as
    stopped, not retried; the next step still runs in the same call."""
    monkeypatch.setattr(campaign, "STEP_LIMITS", {"bench": 2, "cuda-tests": 60})
    monkeypatch.setattr(campaign, "BENCH_COMMAND", ["-c", "import time; print('benching', flush=True); time.sleep(60)"])
    monkeypatch.setattr(campaign, "CUDA_TESTS", ["-c", "print('tests ran')"])
    runs = campaign.Campaign(tmp_path / "work", tmp_path / "out", "cpu", True, campaign.Budget(300, pack=0.0))
    started = campaign.time.monotonic()
    runs.call(["bench", "cuda-tests"])
    assert campaign.time.monotonic() - started < 30
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert state["steps"]["bench"]["status"] == "stopped" and "budget of 2 s" in state["steps"]["bench"]["error"]
    assert state["steps"]["cuda-tests"]["status"] == "done"
    log = (tmp_path / "out" / "campaign.log").read_text()
    assert "benching" in log and "(SIGINT) at its budget" in log and "tests ran" in log
    runs.call(["bench", "cuda-tests"])  # settled: a second call does not run either again
    assert (tmp_path / "out" / "campaign.log").read_text().count("\nbenching\n") == 1


def test_the_campaign_needs_a_gpu_unless_tiny(campaign, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(campaign.torch.cuda, "is_available", lambda: False)
    assert campaign.main(["--out", str(tmp_path)]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        campaign.main(["--tiny", "--out", str(tmp_path), "--budget", "0"])
    assert e.value.code == 2


@pytest.mark.slow
def test_a_tiny_campaign_runs_pauses_and_a_second_call_resumes_it(campaign, tmp_path, monkeypatch):
    """Two calls as on the device: the first benches and stops conv32 after one epoch (SIGTERM, checkpoint);
    the second, on a fresh work folder with the first call's OUT carried as its state, resumes the run rather
    than restarting it, skips the bench, and returns the row, the evaluation and the log."""
    steps = ["--tiny", "--only", "bench", "conv32", "--budget", "3000"]
    first, second = tmp_path / "out1", tmp_path / "out2"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the runs unpack MNIST into ~/.cache/pyro_vae
    assert campaign.main([*steps, "--out", str(first), "--work", str(tmp_path / "work1"),
                          "--state", str(tmp_path / "nothing"), "--epochs-per-call", "1"]) == 0
    names = {p.name for p in _returned_files(first)}
    assert {"campaign.log", "state.json", "bench.txt", "evaluations.json", "campaign-state.tar.0"} <= names
    state = json.loads((first / "state.json").read_text())
    assert state["steps"]["bench"]["status"] == "done" and state["steps"]["conv32"]["status"] == "training"
    assert "training paused at epoch 1/2" in (first / "campaign.log").read_text()
    assert "bf16 at batch 16: project-bf16/project" in (first / "bench.txt").read_text()  # issue 40's sides too

    assert campaign.main([*steps, "--out", str(second), "--work", str(tmp_path / "work2"),
                          "--state", str(first)]) == 0
    _returned_files(second)
    log = (second / "campaign.log").read_text()
    this_call = log[log.index("call 2:"):]
    assert "restored the state of call 1" in log and "--resume" in this_call and "benchmarks.bench" not in this_call
    assert "epoch   1/2" not in this_call and "epoch   2/2" in this_call  # resumed, not restarted
    state = json.loads((second / "state.json").read_text())
    assert state["calls"] == 2 and state["steps"]["conv32"]["status"] == "done"
    rows = list(csv.DictReader(open(second / "results.csv")))
    assert [r["experiment"] for r in rows] == ["conv32"] and rows[0]["epochs"] == "2" and rows[0]["k"] == "4"
    evaluation = json.loads((second / "evaluations.json").read_text())["conv32"]
    assert evaluation["num_images"] == 16 and evaluation["k"] == 4
    assert f"{evaluation['log_px']['mean']:.2f}" == rows[0]["log_px"]  # the row is that evaluation's figure


def test_a_step_that_breaks_is_marked_failed_and_the_next_one_still_runs(campaign, tmp_path, monkeypatch):
    runs = campaign.Campaign(tmp_path / "work", tmp_path / "out", "cpu", True, campaign.Budget(100))

    def experiment(name):
        if name == "conv32":
            raise RuntimeError("boom")
        runs.step_state(name)["status"] = "done"
        return True

    monkeypatch.setattr(runs, "experiment", experiment)
    runs.call(["conv32", "best"])
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert state["steps"]["conv32"] == {"status": "failed", "error": "RuntimeError: boom"}
    assert state["steps"]["best"]["status"] == "done"
    assert "RuntimeError: boom" in (tmp_path / "out" / "campaign.log").read_text()
