"""`--tensorboard`: each epoch's row of metrics.jsonl and its two pictures, as TensorBoard curves and images.

Written into RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`, or `--logdir runs` for every run), one
event file per training session, with the epoch as TensorBoard's step. A resumed session purges what an
earlier one wrote from the epoch it resumes on (a kill between an epoch's line and its checkpoint leaves an
epoch that the resumed run writes again): TensorBoard's readers then show each epoch once, on one curve.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

FOLDER = "tensorboard"  # in the run directory
TAGS = {  # metrics.jsonl's field -> its TensorBoard tag; a field a run does not have is not written
    "train_objective": "train/objective",
    "kl_weight": "train/kl_weight",
    "kl_floored": "train/kl_floored",
    "test_elbo": "test/elbo",
    "test_kl": "test/kl",
    "test_accuracy": "test/accuracy",
    "images_per_s": "speed/images_per_s",
    "seconds": "speed/seconds",
}


class EpochBoard:
    """A TensorBoard writer of one training session that writes one epoch at a time."""

    def __init__(self, out: Path, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is imported only by runs that write it

        folder = Path(out) / FOLDER
        _after_earlier_files(folder)
        # purge_step: TensorBoard's readers drop what the earlier files hold from this epoch on
        self.writer = SummaryWriter(str(folder), purge_step=first_epoch)

    def write(self, row: dict, pictures: dict[str, Path]) -> None:
        """One epoch: the row's figures as scalars and each picture (a greyscale PNG) as an image, at its epoch."""
        from PIL import Image

        epoch = row["epoch"]
        for field, tag in TAGS.items():
            if field in row:
                self.writer.add_scalar(tag, row[field], epoch)
        for tag, path in pictures.items():
            with Image.open(path) as picture:
                self.writer.add_image(tag, np.asarray(picture.convert("L")), epoch, dataformats="HW")
        self.writer.flush()  # the epoch is on disk before its checkpoint: a kill loses nothing

    def close(self) -> None:
        self.writer.close()


def _after_earlier_files(folder: Path) -> None:
    """Wait, if need be, for the second after the newest event file's: TensorBoard reads a folder's files in the
    order of their names, which begin with the second each was created in (then host, process id, counter), and
    a session's purge must come after the files it purges."""
    newest = 0
    for path in folder.glob("events.out.tfevents.*"):
        try:
            newest = max(newest, int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    while int(time.time()) <= newest:
        time.sleep(0.05)


@contextmanager
def epoch_board(out: Path, first_epoch: int, enabled: bool):
    """An EpochBoard for the session that begins at first_epoch, closed at its end; None when not enabled."""
    if not enabled:
        yield None
        return
    board = EpochBoard(out, first_epoch)
    try:
        yield board
    finally:
        board.close()
