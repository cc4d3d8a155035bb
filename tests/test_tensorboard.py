"""--tensorboard: the event files, read back with TensorBoard's own reader, hold metrics.jsonl's figures and the
epoch's pictures, each epoch once, across resumes at an epoch's end, after a kill and in the middle of an epoch."""

import dataclasses
import io
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pyro_vae.checkpoint import read_checkpoint, save_checkpoint
from pyro_vae.tensorboard_log import FOLDER, TAGS
from pyro_vae.train import Interrupted, SVIStep, main, resume


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def _argv(config) -> list[str]:
    return ["--epochs", str(config.epochs), "--batch-size", str(config.batch_size), "--train-size",
            str(config.train_size), "--test-size", str(config.test_size), "--latent-dim", str(config.latent_dim),
            "--conv-channels", *map(str, config.conv_channels), "--data-dir", config.data_dir, "--out", config.out,
            "--device", "cpu"]


def _board(run: Path) -> EventAccumulator:
    """The run's TensorBoard folder as TensorBoard reads it: every event kept, earlier sessions' purged ones gone."""
    board = EventAccumulator(str(run / FOLDER), size_guidance={"scalars": 0, "images": 0})
    return board.Reload()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_board_is_metrics(run: Path) -> None:
    board, rows = _board(run), _rows(run)
    tags = board.Tags()
    for field, tag in TAGS.items():
        if field not in rows[0]:
            assert tag not in tags["scalars"]
            continue
        events = board.Scalars(tag)
        # TensorBoard keeps a scalar as a float32: each equals metrics.jsonl's figure rounded to one
        assert [(e.step, e.value) for e in events] == [(r["epoch"], float(np.float32(r[field]))) for r in rows], tag
    for tag, name in (("samples", "samples"), ("reconstructions", "recon")):
        images = board.Images(tag)
        assert [i.step for i in images] == [r["epoch"] for r in rows]
        last = images[-1]  # the PNG of the epoch, pixel for pixel
        written = np.asarray(Image.open(run / "images" / f"{name}_{last.step:03d}.png").convert("L"))
        shown = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert("L"))
        assert (last.height, last.width) == written.shape and np.array_equal(shown, written)


def _signal_at_step(monkeypatch, step: int) -> None:
    """A real SIGTERM to this process after the given (1-based) step of this session."""
    real_step, count = SVIStep.step, [0]

    def step_then_signal(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        count[0] += 1
        if count[0] == step:
            signal.raise_signal(signal.SIGTERM)
        return loss

    monkeypatch.setattr(SVIStep, "step", step_then_signal)


@pytest.mark.slow
def test_the_curves_equal_metrics_jsonl_once_per_epoch_across_every_kind_of_resume(small_config, monkeypatch,
                                                                                    capsys):
    config = dataclasses.replace(small_config, epochs=4, train_size=256, test_size=64)  # 4 steps an epoch
    run = Path(config.out)
    assert main(_argv(config) + ["--tensorboard", "--stop-after", "1"]) == 0  # session 1: epoch 1, paused at its end
    assert [r["epoch"] for r in _rows(run)] == [1] and len(list((run / FOLDER).iterdir())) == 1
    _assert_board_is_metrics(run)
    assert "test_kl" in _rows(run)[0] and _rows(run)[0]["test_kl"] > 0  # KL(q || p) of a trained epoch

    def killed_at_epoch_2(path, state):  # session 2: epoch 2 reaches metrics.jsonl and TensorBoard, then dies
        if state["epoch"] == 2:
            raise _Killed
        save_checkpoint(path, state)

    monkeypatch.setattr("pyro_vae.train.save_checkpoint", killed_at_epoch_2)
    with pytest.raises(_Killed):
        resume(run)  # without asking: the run has TensorBoard's folder, so its curves go on
    assert [s.step for s in _board(run).Scalars("test/elbo")] == [1, 2]
    monkeypatch.undo()

    _signal_at_step(monkeypatch, 2)  # session 3: epoch 2 again, stopped in its middle
    with pytest.raises(Interrupted):
        resume(run)
    assert read_checkpoint(run)["position"] == 2 and [r["epoch"] for r in _rows(run)] == [1]
    assert [s.step for s in _board(run).Scalars("test/elbo")] == [1]  # epoch 2 of session 2 is purged
    monkeypatch.undo()

    assert main(["--resume", str(run)]) == 0  # session 4: the rest of epoch 2, then 3 and 4
    assert [r["epoch"] for r in _rows(run)] == [1, 2, 3, 4]
    assert len(list((run / FOLDER).iterdir())) == 4  # one event file per session
    _assert_board_is_metrics(run)


def test_without_the_flag_nothing_is_written_for_tensorboard(small_config):
    config = dataclasses.replace(small_config, epochs=1, max_steps=1, train_size=128, test_size=64)
    assert main(_argv(config)) == 0
    assert not (Path(config.out) / FOLDER).exists()
