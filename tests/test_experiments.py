"""The experiments runner: every config is valid, and a tiny experiment adds a real row to the table."""

import csv
import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
import torch

from pyro_vae import Config

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture
def runner(experiment_script):
    return experiment_script("run")


@pytest.fixture
def tiny_experiment(runner, tmp_path, data_dir, monkeypatch):
    """A tiny experiment in a folder of its own, with its own results file and page."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.toml").write_text(
        'description = "tiny"\nreference = "none"\n[config]\nlatent_dim = 2\nconv_channels = [4, 8]\n'
        f'train_size = 256\ntest_size = 64\nbatch_size = 64\ndata_dir = "{data_dir}"\n[short]\nepochs = 2\n[full]\n')
    page = tmp_path / "results.md"
    page.write_text(f"intro\n{runner.TABLE_START}\nold\n{runner.TABLE_END}\nafter\n")
    monkeypatch.setattr(runner, "CONFIGS", tmp_path / "configs")
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results.csv")
    monkeypatch.setattr(runner, "RESULTS_PAGE", page)
    return runner


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "configs").glob("*.toml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("full", [False, True])
def test_every_experiment_is_a_valid_config(path, full, runner, tmp_path):
    spec = tomllib.loads(path.read_text())
    assert spec["description"] and spec["reference"]
    config = runner.experiment_config(path.stem, full, tmp_path, device="cpu")
    assert isinstance(config, Config) and config.errors() == []


@pytest.mark.slow
def test_a_tiny_experiment_adds_a_row_to_the_csv_and_the_results_page(tiny_experiment, tmp_path):
    assert tiny_experiment.main(["tiny", "--k", "5", "--limit", "16", "--out-root", str(tmp_path / "runs"),
                                 "--device", "cpu", "--epochs", "1"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 1 and rows[0]["experiment"] == "tiny" and rows[0]["version"] == "short"
    assert rows[0]["k"] == "5" and rows[0]["images"] == "16" and "--latent-dim 2" in rows[0]["variant"]
    assert rows[0]["epochs"] == "1"  # --epochs overrides the version's budget, and the row says so
    text = (tmp_path / "results.md").read_text()
    assert "old" not in text and "| tiny | short |" in text and text.endswith("after\n")


@pytest.mark.slow
def test_a_run_trained_and_resumed_by_the_trainer_is_recorded_with_its_sessions(tiny_experiment, tmp_path, data_dir,
                                                                                  monkeypatch):
    import signal

    from pyro_vae.train import SVIStep, main as train_main, resume

    run = tmp_path / "run"
    flags = ["--conv-channels", "4", "8", "--train-size", "256", "--test-size", "64", "--batch-size", "64",
             "--epochs", "2", "--data-dir", str(data_dir), "--device", "cpu"]  # tiny.toml's, with --latent-dim 2
    real_step, count = SVIStep.step, [0]

    def stopped_at_step_6(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 6:
            signal.raise_signal(signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(SVIStep, "step", stopped_at_step_6)
        assert train_main(flags + ["--latent-dim", "2", "--out", str(run)]) == 128 + signal.SIGTERM
    with pytest.raises(SystemExit, match="has trained 1 of its 2 epochs; finish it first"):
        tiny_experiment.main(["tiny", "--run", str(run), "--k", "5", "--limit", "16"])
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # resumed with another number of threads
    try:
        resume(run)
    finally:
        torch.set_num_threads(threads)
    assert tiny_experiment.main(["tiny", "--run", str(run), "--k", "5", "--limit", "16"]) == 0
    row, = list(csv.DictReader(open(tmp_path / "results.csv")))
    seconds = sum(json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines())
    assert row["train_minutes"] == f"{seconds / 60:.1f}" and row["epochs"] == "2" and row["k"] == "5"
    assert row["device"] == f"CPU ({threads}-{threads + 1} threads)"  # the sessions', not the evaluation's
    assert "resumed at step 6" in row["extra"] and "evaluated in" in row["extra"]
    figures = json.loads((run / "evaluation.json").read_text())
    assert row["log_px"] == f"{figures['log_px']['mean']:.2f}" and figures["num_images"] == 16
    assert not (run / "evaluation.partial.json").exists()

    other = tmp_path / "other"  # a run of another config is not this experiment's
    assert train_main(flags + ["--latent-dim", "3", "--max-steps", "1", "--out", str(other)]) == 0
    with pytest.raises(SystemExit, match="is not a run of tiny.*--latent-dim 3"):
        tiny_experiment.main(["tiny", "--run", str(other)])


def test_the_results_page_holds_the_table_of_results_csv(runner):
    # run.py writes its rows into docs/results.md between the markers; the page must have them and be up to date
    text = runner.RESULTS_PAGE.read_text()
    assert f"{runner.TABLE_START}\n{runner.markdown_table()}\n{runner.TABLE_END}" in text


def test_digit_classifier_trains_even_when_called_under_no_grad(monkeypatch, data_dir):
    # sample_recognition runs under no_grad and trains the classifier on first use
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import digit_classifier

    with torch.no_grad():
        _, accuracy = digit_classifier.train_classifier(str(data_dir), epochs=1, train_size=1024, test_size=1000)
    assert accuracy > 0.5  # ten classes: chance is 0.1


def test_grey_test_accuracy_feeds_the_classifier_the_grey_images(runner, data_dir):
    class Trained:  # right only when it is shown grey values, as Pyro's tutorial's images are
        config = Config(conditional=True, labels=100, test_size=64, data_dir=str(data_dir))

        def classify(self, x):
            grey = ((x > 0) & (x < 1)).flatten(1).any(1)
            return torch.where(grey, labels, (labels + 1) % 10)

    labels = runner.load_mnist(data_dir, binarize="none", test_size=64).test_labels
    assert runner.grey_test_accuracy(Trained()) == 1.0


def test_the_variant_column_writes_flags_as_they_are_typed(runner):
    config = Config(layers=3, upper_dims=(16, 8), guide="ladder")
    assert runner._variant(config) == "--layers 3 --upper-dims 16 8 --guide ladder"
    assert runner._variant(Config()) == "defaults"


def test_paired_logpx_differences_runs_on_the_same_images_and_draws(experiment_script, small_config, capsys,
                                                                   monkeypatch):
    """One run against itself: the same draws from the same seed, so a difference of exactly 0 ± 0; the stderr is
    the per-image differences' standard deviation over sqrt(n), not their variance."""
    import pyro_vae
    from pyro_vae.train import train

    paired = experiment_script("paired_logpx")
    run = train(dataclasses.replace(small_config, epochs=1))
    capsys.readouterr()  # the training's lines
    assert paired.main([str(run), str(run), "--limit", "8", "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].endswith("+0.000 +- 0.000 against the first")
    trained = pyro_vae.load(run)
    fixed = {0: torch.zeros(4), 1: torch.tensor([1.0, 3.0, 1.0, 3.0])}  # differences: std 1.1547, n = 4
    calls = iter(range(2))
    monkeypatch.setattr(paired, "per_image_log_px", lambda *args: fixed[next(calls)])
    rows = paired.paired([trained, trained], torch.zeros(4, 1, 28, 28), 3, 0)
    assert rows[1]["difference"] == pytest.approx(2.0) and rows[1]["stderr"] == pytest.approx(1.1547005 / 2)
    with pytest.raises(SystemExit) as info:
        paired.main([str(run), "--limit", "8"])  # one run: nothing to pair
    assert info.value.code == 2
    assert paired.main([str(run), str(run.parent / "missing")]) == 1
    assert "error: " in capsys.readouterr().err
