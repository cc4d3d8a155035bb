"""Every source of images a run can train on: MNIST (data.py), Fashion-MNIST and KMNIST from their IDX files, and
your own images (a folder, or a .npy/.npz array). Each becomes the same `data.MNIST` container of tensors, and
its shape and classes go into the Config (`fill_config`), so the networks are sized from the data."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .data import SPLITS, DataError, as_data, load_mnist, parse_idx

# --dataset NAME: torchvision's class (its folder under --data-dir is DATA_DIR/<class>/raw) and where to get the files
IDX_DATASETS = {
    "fashion-mnist": ("FashionMNIST", "https://github.com/zalandoresearch/fashion-mnist"),
    "kmnist": ("KMNIST", "https://github.com/rois-codh/kmnist"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SIDES = (16, 64)  # the image sides the networks are sized for
SPLIT_SEED = 0  # the held-out split of your own images: the same images every run, whatever --seed
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")  # PIL modes read as one channel ("P": if its palette is grey)


def load_data(config, *, device="cpu", split: str = "both", data_dir: str | None = None):
    """The images config names (--data, else --dataset) as a `data.MNIST` on device; `split` as load_mnist's."""
    if config.data:
        return load_images(config.data, image_size=config.image_size, test_fraction=config.test_fraction,
                           binarize=config.binarize, device=device, train_size=config.train_size,
                           test_size=config.test_size)
    data_dir = data_dir or config.data_dir
    if config.dataset == "mnist":
        return load_mnist(data_dir, binarize=config.binarize, device=device, download=config.download,
                          train_size=config.train_size, test_size=config.test_size, split=split)
    return load_idx_dataset(config.dataset, data_dir, binarize=config.binarize, device=device,
                            download=config.download, train_size=config.train_size, test_size=config.test_size,
                            split=split)


def fill_config(config, data) -> None:
    """Write the data's image shape and number of classes into config (checking any given), and refuse what the
    data cannot support: a CVAE on unlabelled images, a batch larger than the training set."""
    shape = data.image_shape
    if config.image_shape and tuple(config.image_shape) != shape:
        raise DataError(f"--image-shape {' '.join(map(str, config.image_shape))} was given, but the images are "
                        f"{' '.join(map(str, shape))} (channels, height, width)")
    if config.num_classes and config.num_classes != data.num_classes:
        raise DataError(f"--num-classes {config.num_classes} was given, but the labels have {data.num_classes}")
    config.image_shape, config.num_classes = shape, data.num_classes
    wider = config.kernel_errors()  # your own images' side is known only now
    if wider:
        raise DataError(wider[0])
    if config.conditional and data.num_classes < 2:
        raise DataError("--conditional needs labelled images (class subfolders, or labels in the .npz), and these "
                        "have none")
    if data.num_train and config.batch_size > data.num_train:
        raise DataError(f"--batch-size must be at most the number of training images ({data.num_train}), "
                        f"not {config.batch_size}")


def _check_side(shape: tuple, where) -> None:
    low, high = SIDES
    if not all(low <= side <= high for side in shape[1:]):
        raise DataError(f"{where}: images of {shape[1]} x {shape[2]} pixels; the networks take sides {low} to "
                        f"{high}: resize them with --image-size")


# --dataset fashion-mnist | kmnist: four IDX files, directly in --data-dir or in torchvision's layout


def _find(name: str, folders: list[Path]) -> Path | None:
    for folder in folders:
        for path in (folder / f"{name}.gz", folder / name):
            if path.is_file():
                return path
    return None


def _read_idx_file(path: Path) -> torch.Tensor:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return parse_idx(raw, path)
    except (OSError, EOFError, ValueError, RuntimeError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def load_idx_dataset(name: str, data_dir: str | Path, *, binarize: str = "dynamic", device="cpu",
                     download: bool = False, train_size: int = 0, test_size: int = 0, split: str = "both"):
    """Fashion-MNIST or KMNIST from their IDX files (gzipped or not) in data_dir or data_dir/<Class>/raw; with
    download, torchvision's dataset class fetches what is missing."""
    folder_name, home = IDX_DATASETS[name]
    data_dir = Path(data_dir).expanduser()
    folders = [data_dir, data_dir / folder_name / "raw"]
    wanted = ("train", "test") if split == "both" else (split,)
    names = [file for which in wanted for file in SPLITS[which]]
    if download and any(_find(file, folders) is None for file in names):
        _download(name, data_dir)
    missing = [file for file in names if _find(file, folders) is None]
    if missing:
        raise DataError(f"--dataset {name}: no {', '.join(f + '.gz' for f in missing)} in {folders[0]} or "
                        f"{folders[1]}; put the four IDX files from {home} there, or add --download")
    splits = []
    for which, size in (("train", train_size), ("test", test_size)):
        if which not in wanted:
            splits.append((torch.empty(0, 1, 28, 28, dtype=torch.uint8), torch.empty(0, dtype=torch.long)))
            continue
        images, labels = (_read_idx_file(_find(file, folders)) for file in SPLITS[which])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"--dataset {name}: the {which} files hold images {tuple(images.shape)} and labels "
                            f"{tuple(labels.shape)}, not (N, H, W) and (N,)")
        if size:
            images, labels = images[:size], labels[:size]
        splits.append((images.unsqueeze(1), labels.long()))
    _check_side(tuple(splits[0][0].shape[1:]) if "train" in wanted else tuple(splits[1][0].shape[1:]), folders[0])
    return as_data(*splits, binarize=binarize, device=device)


def _download(name: str, data_dir: Path) -> None:
    import torchvision.datasets

    folder_name, _ = IDX_DATASETS[name]
    try:
        for train in (True, False):
            getattr(torchvision.datasets, folder_name)(str(data_dir), train=train, download=True)
    except (OSError, RuntimeError) as e:
        raise DataError(f"could not download {name} into {data_dir}: {e}") from e


# --data PATH: your own images


def load_images(path: str | Path, *, image_size: int = 0, test_fraction: float = 0.1, binarize: str = "dynamic",
                device="cpu", train_size: int = 0, test_size: int = 0):
    """Your own images: a folder (class subfolders give labels, as torchvision's ImageFolder; a flat folder is
    unlabelled) or a .npy/.npz array; resized to image_size x image_size where given, then split with SPLIT_SEED."""
    path = Path(path).expanduser()
    if path.is_dir():
        images, labels, num_classes = _read_folder(path, image_size)
    elif path.suffix in (".npy", ".npz") and path.is_file():
        images, labels, num_classes = _read_array(path)
        if image_size:
            images = _resize(images, image_size)
    else:
        raise DataError(f"--data {path}: not a folder of images nor a .npy/.npz file")
    _check_side(tuple(images.shape[1:]), f"--data {path}")
    num_test = round(len(images) * test_fraction)
    if num_test < 1 or num_test >= len(images):
        raise DataError(f"--data {path}: {len(images)} images and --test-fraction {test_fraction} leave "
                        f"{num_test} for the test set and {len(images) - num_test} for training; each needs one")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:num_test], order[num_test:]
    train, test = train[:train_size or None], test[:test_size or None]
    return as_data((images[train], labels[train]), (images[test], labels[test]), binarize=binarize, device=device,
                   num_classes=num_classes)


def _read_folder(path: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """uint8 images (N, C, H, W), labels (N,) and the number of classes of a folder of images."""
    from PIL import Image, UnidentifiedImageError

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and images_in(p))
    files = [(p, label) for label, name in enumerate(classes) for p in images_in(path / name)] if classes else \
        [(p, 0) for p in images_in(path)]
    if not files:
        raise DataError(f"--data {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its subfolders")
    opened = []
    for file, label in files:
        try:
            with Image.open(file) as image:
                image.load()
                opened.append((image.copy(), label))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"--data {path}: cannot read {file}: {e}") from e
    grey = all(image.mode in GREY_MODES and (image.mode != "P" or _grey_palette(image)) for image, _ in opened)
    mode = "L" if grey else "RGB"
    arrays = []
    for image, _ in opened:
        image = image.convert(mode)
        if image_size:
            image = image.resize((image_size, image_size), Image.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8))
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise DataError(f"--data {path}: the images differ in size ({', '.join(f'{w} x {h}' for h, w in sorted(sizes))}"
                        f"): give --image-size to resize them all")
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, 3)
    images = torch.from_numpy(stacked).unsqueeze(1) if grey else torch.from_numpy(stacked).permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return images.contiguous(), labels, max(1, len(classes))


def _grey_palette(image) -> bool:
    rgb = image.convert("RGB")
    r, g, b = (np.asarray(channel) for channel in rgb.split())
    return bool((r == g).all() and (g == b).all())


def _read_array(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """uint8 images (N, C, H, W), labels (N,) and classes from a .npy array or a .npz (images in x or images, or
    its only array; labels, if any, in y or labels)."""
    try:
        if path.suffix == ".npy":
            array, labels = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                key = next((k for k in ("x", "images") if k in names), names[0] if len(names) == 1 else None)
                if key is None:
                    raise DataError(f"--data {path}: put the images in an array named x (or images), and any "
                                    f"labels in y; it holds {', '.join(names)}")
                array = archive[key]
                label_key = next((k for k in ("y", "labels") if k in names), None)
                labels = archive[label_key] if label_key else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"--data {path}: cannot read it: {e}") from e
    images = _as_uint8_nchw(array, path)
    if labels is None:
        return images, torch.zeros(len(images), dtype=torch.long), 1
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0:
        raise DataError(f"--data {path}: labels must be {len(images)} integers 0, 1, ..., not {labels.dtype} "
                        f"{labels.shape}")
    return images, torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1


def _as_uint8_nchw(array: np.ndarray, path: Path) -> torch.Tensor:
    """An array (N, H, W), (N, H, W, C) or (N, C, H, W), C 1 or 3, uint8 or float in [0, 1], as uint8 (N, C, H, W)."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif not (array.ndim == 4 and array.shape[1] in (1, 3)):
        raise DataError(f"--data {path}: an array of shape {array.shape}; give (N, H, W), (N, H, W, C) or "
                        "(N, C, H, W) with C 1 (grey) or 3 (RGB)")
    if array.dtype == np.uint8:
        pass
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise DataError(f"--data {path}: float pixels must lie in [0, 1], not {array.min()} .. {array.max()}")
        array = np.rint(array * 255).astype(np.uint8)  # 8-bit, as the logistic mixture's bins are
    else:
        raise DataError(f"--data {path}: pixels of type {array.dtype}; give uint8 (0 .. 255) or float in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(array))


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) resized to side x side (bilinear, antialiased), still 8-bit."""
    resized = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)
