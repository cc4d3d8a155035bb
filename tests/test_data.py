"""The MNIST loader: shipped files, checksums, corrupt input, binarization, batches."""

import gzip
import hashlib
import struct

import pytest
import torch

from pyro_vae.data import FILES, DataError, load_mnist


def _idx(array: torch.Tensor) -> bytes:
    """Encode a uint8 tensor in the IDX format of the MNIST files."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.numpy().tobytes()


def _write_source(folder, n_train=20, n_test=10):
    """Small MNIST-shaped IDX files, gzipped, with their SHA256SUMS, as the project ships them."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=gen, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.arange(n_train, dtype=torch.uint8) % 10,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=gen, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.arange(n_test, dtype=torch.uint8) % 10,
    }
    sums = []
    for name, array in arrays.items():
        packed = gzip.compress(_idx(array))
        (folder / f"{name}.gz").write_bytes(packed)
        sums.append(f"{hashlib.sha256(packed).hexdigest()}  {name}.gz")
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return arrays


def test_loads_small_idx_files_written_here(tmp_path):
    arrays = _write_source(tmp_path / "src")
    data = load_mnist(tmp_path / "cache", binarize="none", source=tmp_path / "src")
    assert data.train_images.shape == (20, 1, 28, 28) and data.test_images.shape == (10, 1, 28, 28)
    assert torch.equal(data.train_images[:, 0], arrays["train-images-idx3-ubyte"].float() / 255)
    assert torch.equal(data.test_labels, arrays["t10k-labels-idx1-ubyte"].long())
    assert sorted(p.name for p in (tmp_path / "cache" / "MNIST" / "raw").iterdir()) == sorted(FILES)


def test_corrupt_file_is_refused_by_name(tmp_path):
    _write_source(tmp_path / "src")
    packed = tmp_path / "src" / "t10k-labels-idx1-ubyte.gz"
    damaged = bytearray(packed.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    packed.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*checksum"):
        load_mnist(tmp_path / "cache", source=tmp_path / "src")


def test_missing_file_is_refused_by_name(tmp_path):
    _write_source(tmp_path / "src")
    (tmp_path / "src" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing MNIST file .*train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path / "cache", source=tmp_path / "src")


def test_truncated_unpacked_file_is_a_clear_error(tmp_path):
    _write_source(tmp_path / "src")
    load_mnist(tmp_path / "cache", source=tmp_path / "src")
    raw = tmp_path / "cache" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(DataError, match="corrupt|unexpected"):
        load_mnist(tmp_path / "cache", source=tmp_path / "src")


def test_shipped_mnist_has_the_official_sizes_and_label_counts(data_dir):
    data = load_mnist(data_dir, binarize="none")
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert data.test_labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_binarization_modes(data_dir):
    kwargs = dict(train_size=100, test_size=100)
    grey = load_mnist(data_dir, binarize="none", **kwargs)
    threshold = load_mnist(data_dir, binarize="threshold", **kwargs)
    dynamic = load_mnist(data_dir, binarize="dynamic", **kwargs)
    assert ((grey.test_images > 0) & (grey.test_images < 1)).any()
    assert torch.equal(threshold.test_images, (grey.test_images > 0.5).float())
    # the dynamic test set is drawn once with a fixed seed: the same in every run
    torch.manual_seed(123)
    assert torch.equal(dynamic.test_images, load_mnist(data_dir, binarize="dynamic", **kwargs).test_images)
    assert set(dynamic.test_images.unique().tolist()) == {0.0, 1.0}
    # training images are binarized afresh each time they are used
    idx = torch.arange(50)
    first, second = dynamic.batch(idx)[0], dynamic.batch(idx)[0]
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    assert torch.equal(threshold.batch(idx)[0], threshold.batch(idx)[0])
