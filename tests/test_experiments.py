"""The experiments runner: every config is valid, and a tiny experiment adds a real row to the table."""

import csv
import tomllib
from pathlib import Path

import pytest
import torch

from pyro_vae import Config

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture
def runner(experiment_script):
    return experiment_script("run")


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "configs").glob("*.toml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("full", [False, True])
def test_every_experiment_is_a_valid_config(path, full, runner, tmp_path):
    spec = tomllib.loads(path.read_text())
    assert spec["description"] and spec["reference"]
    config = runner.experiment_config(path.stem, full, tmp_path, device="cpu")
    assert isinstance(config, Config) and config.errors() == []


@pytest.mark.slow
def test_a_tiny_experiment_adds_a_row_to_the_csv_and_the_results_page(runner, tmp_path, data_dir, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.toml").write_text(
        'description = "tiny"\nreference = "none"\n[config]\nlatent_dim = 2\nconv_channels = [4, 8]\n'
        f'train_size = 256\ntest_size = 64\nbatch_size = 64\ndata_dir = "{data_dir}"\n[short]\nepochs = 1\n[full]\n')
    page = tmp_path / "results.md"
    page.write_text(f"intro\n{runner.TABLE_START}\nold\n{runner.TABLE_END}\nafter\n")
    monkeypatch.setattr(runner, "CONFIGS", tmp_path / "configs")
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results.csv")
    monkeypatch.setattr(runner, "RESULTS_PAGE", page)
    assert runner.main(["tiny", "--k", "5", "--limit", "16", "--out-root", str(tmp_path / "runs"), "--device", "cpu",
                        "--epochs", "2"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 1 and rows[0]["experiment"] == "tiny" and rows[0]["version"] == "short"
    assert float(rows[0]["log_px"]) >= float(rows[0]["test_elbo"])  # the K-sample bound is the tighter one
    assert rows[0]["k"] == "5" and rows[0]["images"] == "16" and "--latent-dim 2" in rows[0]["variant"]
    assert rows[0]["epochs"] == "2"  # --epochs overrides the version's budget, and the row says so
    text = page.read_text()
    assert "old" not in text and "| tiny | short |" in text and text.endswith("after\n")


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
