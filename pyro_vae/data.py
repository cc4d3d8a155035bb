"""MNIST through torchvision, from the files this project ships; binarization; batches on the device."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .shipped import shipped

MNIST_TRAIN, MNIST_TEST = 60000, 10000  # images in MNIST's official training and test splits
IMAGE_SHAPE = (1, 28, 28)  # one MNIST image: channels, height, width
NUM_CLASSES = 10  # the digits 0-9
SHIPPED_DIR = shipped("data/mnist", "mnist")  # the checkout's data/mnist, or the installed wheel's copy
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # images, labels
FILES = SPLITS["train"] + SPLITS["test"]
TEST_BINARIZATION_SEED = 0  # the dynamic test set is drawn once with this seed, so test figures compare across runs


class DataError(Exception):
    """MNIST files are missing, corrupt or unreadable."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checksums(source: Path) -> dict[str, str]:
    sums = source / "SHA256SUMS"
    if not sums.is_file():
        raise DataError(f"missing checksum file {sums}")
    lines = (line.split() for line in sums.read_text().splitlines() if line.strip())
    return {name.lstrip("*"): digest for digest, name in lines}


def _expected(checksums: dict[str, str], name: str, source: Path) -> str:
    if name not in checksums:
        raise DataError(f"{source / 'SHA256SUMS'} has no checksum for {name}")
    return checksums[name]


def _unpack_one(packed: Path, target: Path, checksums: dict[str, str], source: Path) -> None:
    """Unpack one checked .gz to target, checking what it unpacks to as well."""
    if not packed.is_file():
        raise DataError(f"missing MNIST file {packed}")
    if _sha256(packed) != _expected(checksums, packed.name, source):
        raise DataError(f"MNIST file {packed} does not match its checksum in {source / 'SHA256SUMS'}")
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (OSError, EOFError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"MNIST file {packed} could not be unpacked: {e}") from e
    if _sha256(tmp) != _expected(checksums, target.name, source):
        tmp.unlink()
        raise DataError(f"MNIST file {packed} unpacks to bytes that do not match the checksum of {target.name} "
                        f"in {source / 'SHA256SUMS'}")
    os.replace(tmp, target)  # atomic: a half-written file never looks unpacked


def unpack(data_dir: str | Path, source: Path = SHIPPED_DIR, names: tuple[str, ...] = FILES) -> Path:
    """Unpack the shipped gzipped IDX files into torchvision's raw layout under data_dir, checking each.

    Files unpacked earlier are checked against their SHA-256 too, on every call (about 55 MB for all
    four): one that no longer matches is unpacked again from its .gz, and stderr says so.
    """
    raw = Path(data_dir).expanduser() / "MNIST" / "raw"
    checksums = _read_checksums(source)
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = raw / name
            if target.is_file():
                if _sha256(target) == _expected(checksums, name, source):
                    continue
                print(f"pyro_vae: {target} does not match its checksum in {source / 'SHA256SUMS'} (damaged?); "
                      f"unpacking it again", file=sys.stderr, flush=True)
            _unpack_one(source / f"{name}.gz", target, checksums, source)
    except OSError as e:
        raise DataError(f"cannot use {raw} for MNIST: {e.strerror or e}") from e
    return raw


def _download(data_dir: Path, names: tuple[str, ...]) -> Path:
    """Let torchvision download MNIST into data_dir, then check the files that will be read."""
    from torchvision.datasets import MNIST

    try:
        MNIST(str(data_dir), train=False, download=True)  # fetches all four files; parses only the small test split
    except (OSError, RuntimeError) as e:
        raise DataError(f"could not download MNIST into {data_dir}: {e}") from e
    except (AssertionError, ValueError, TypeError, IndexError):
        pass  # a damaged test file: the checks below name it
    raw = data_dir / "MNIST" / "raw"
    checksums = _read_checksums(SHIPPED_DIR)  # the unpacked files are the same bytes as the shipped ones
    for name in names:
        try:
            damaged = _sha256(raw / name) != _expected(checksums, name, SHIPPED_DIR)
        except OSError as e:
            raise DataError(f"cannot read MNIST file {raw / name}: {e.strerror or e}") from e
        if damaged:
            raise DataError(f"MNIST file {raw / name} does not match its checksum in {SHIPPED_DIR / 'SHA256SUMS'}; "
                            "delete it to download it again")
    return raw


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format: a 4-byte magic number, big-endian sizes, then the data).

    torchvision's reader would do, but importing torchvision imports torch._dynamo: about 10 s a command here.
    """
    return parse_idx(Path(path).read_bytes(), path)


def parse_idx(data: bytes, name) -> torch.Tensor:
    """The tensor an IDX file's bytes hold (see read_idx); name says which file, in the error."""
    if data[:3] != b"\0\0\x08":
        raise ValueError(f"{name} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(shape)


def _read_split(raw: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, 28, 28) uint8 images and (N,) labels of one split, read from checked IDX files."""
    images_file, labels_file = SPLITS[split]
    try:
        images, labels = read_idx(raw / images_file), read_idx(raw / labels_file)
    except (OSError, RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        raise DataError(f"MNIST {split} files under {raw} are unreadable "
                        f"({e or type(e).__name__}); delete them to unpack again") from e
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[1:] or len(images) != len(labels):
        raise DataError(f"MNIST {split} files under {raw} have unexpected shapes "
                        f"{tuple(images.shape)} and {tuple(labels.shape)}")
    return images, labels.long()


@dataclass
class MNIST:
    """The whole data set as tensors on one device; images are (N, 1, 28, 28) in [0, 1]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor  # already binarized as the test figures use them
    test_labels: torch.Tensor
    binarize: str
    labelled: torch.Tensor | None = None  # semi-supervised: indices of the only training labels used
    num_classes: int = NUM_CLASSES  # of the labels (1: unlabelled images, all labelled 0)

    @property
    def image_shape(self) -> tuple:
        """(C, H, W) of one image."""
        return tuple((self.train_images if len(self.train_images) else self.test_images).shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_images)

    def keep_labels(self, n: int, seed: int = 0) -> None:
        """Use only n training labels, n // 10 of each digit (chosen with a fixed seed); the rest are unlabelled."""
        generator = torch.Generator().manual_seed(seed)
        labels = self.train_labels.cpu()
        chosen = []
        for digit in range(self.num_classes):
            where = (labels == digit).nonzero().squeeze(1)
            take = n // self.num_classes + (1 if digit < n % self.num_classes else 0)
            chosen.append(where[torch.randperm(len(where), generator=generator)[:take]])
        self.labelled = torch.cat(chosen).sort().values.to(self.train_labels.device)

    def _batches(self, indices: torch.Tensor, batch_size: int, generator=None) -> list[torch.Tensor]:
        perm = indices[torch.randperm(len(indices), device=indices.device, generator=generator)]
        return list(perm[:len(perm) // batch_size * batch_size].split(batch_size))  # drop the partial batch

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.labelled is None:
            return self.num_train // batch_size
        labelled_batch = min(batch_size, len(self.labelled))
        return (self.num_train - len(self.labelled)) // batch_size + len(self.labelled) // labelled_batch

    def plan_epoch(self, batch_size: int, generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, bool]]:
        """The batches of one pass over the training set in random order: (indices, labels used?) each.

        Semi-supervised, the labelled batches are spread evenly among the unlabelled ones, one pass
        over the labelled images per epoch. The plan is data, so a checkpoint can carry it.
        """
        device = self.train_images.device
        if self.labelled is None:
            everything = torch.arange(self.num_train, device=device)
            return [(idx, True) for idx in self._batches(everything, batch_size, generator)]
        unlabelled = torch.ones(self.num_train, dtype=torch.bool, device=device)
        unlabelled[self.labelled] = False
        plain = self._batches(unlabelled.nonzero().squeeze(1), batch_size, generator)
        labelled = self._batches(self.labelled, min(batch_size, len(self.labelled)), generator)
        every = max(1, -(-len(plain) // max(1, len(labelled))))  # ceil
        plan = []
        for i, idx in enumerate(plain):
            if i % every == 0 and labelled:
                plan.append((labelled.pop(), True))
            plan.append((idx, False))
        return plan + [(idx, True) for idx in labelled]

    def batch(self, indices: torch.Tensor, labelled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training images at these indices, binarized afresh under `dynamic`, with labels if they are used."""
        x = self.train_images[indices]  # (B, 1, 28, 28)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)
        return x, self.train_labels[indices] if labelled else None

    def epoch(self, batch_size: int, generator: torch.Generator | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass over the training set as (x, y) batches; y is None where labels are not used."""
        for indices, labelled in self.plan_epoch(batch_size, generator):
            yield self.batch(indices, labelled)


def load_mnist(data_dir: str | Path = "~/.cache/pyro_vae", *, binarize: str = "dynamic", device="cpu",
               download: bool = False, train_size: int = 0, test_size: int = 0, split: str = "both",
               source: Path = SHIPPED_DIR) -> MNIST:
    """Load MNIST onto `device`, unpacking the shipped files on first use (or downloading with `download`).

    `split` "train" or "test" reads only that split's files; the other split is left empty (0 images).
    """
    if split not in ("train", "test", "both"):
        raise ValueError(f"split must be train, test or both, not {split!r}")
    if binarize not in ("dynamic", "threshold", "none"):
        raise ValueError(f"binarize must be dynamic, threshold or none, not {binarize!r}")
    wanted = ("train", "test") if split == "both" else (split,)
    names = tuple(name for which in wanted for name in SPLITS[which])
    data_dir = Path(data_dir).expanduser()
    raw = _download(data_dir, names) if download else unpack(data_dir, source, names)
    splits = []
    for which, size in (("train", train_size), ("test", test_size)):
        if which in wanted:
            images, labels = _read_split(raw, which)
        else:
            images, labels = torch.empty(0, *IMAGE_SHAPE[1:], dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        if size:
            images, labels = images[:size], labels[:size]
        splits.append((images.unsqueeze(1), labels))
    return as_data(*splits, binarize=binarize, device=device)


def as_data(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *, binarize: str,
            device="cpu", num_classes: int = NUM_CLASSES) -> MNIST:
    """A data set from uint8 images (N, C, H, W) and labels (N,) of each split: pixels in [0, 1], binarized as asked
    (the dynamic test set drawn once, with TEST_BINARIZATION_SEED), on `device`."""
    (train_x, train_y), (test_x, test_y) = ((x.float().div_(255), y) for x, y in (train, test))
    if binarize == "threshold":
        train_x, test_x = (train_x > 0.5).float(), (test_x > 0.5).float()
    elif binarize == "dynamic":
        generator = torch.Generator().manual_seed(TEST_BINARIZATION_SEED)
        test_x = torch.bernoulli(test_x, generator=generator)
    return MNIST(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), binarize,
                 num_classes=num_classes)
