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
        sums.append(f"{hashlib.sha256(_idx(array)).hexdigest()}  {name}")
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


def test_truncated_unpacked_file_is_unpacked_again(tmp_path, capsys):
    arrays = _write_source(tmp_path / "src")
    load_mnist(tmp_path / "cache", source=tmp_path / "src")
    raw = tmp_path / "cache" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:1000])
    data = load_mnist(tmp_path / "cache", binarize="none", source=tmp_path / "src")
    assert torch.equal(data.train_images[:, 0], arrays["train-images-idx3-ubyte"].float() / 255)
    assert "train-images-idx3-ubyte does not match its checksum" in capsys.readouterr().err


def test_bytes_flipped_in_the_unpacked_cache_are_never_loaded(tmp_path, capsys):
    """The shipped test images, unpacked, then damaged in place: the next load restores them and says so."""
    clean = load_mnist(tmp_path, binarize="none", split="test").test_images
    raw = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    damaged = bytearray(raw.read_bytes())
    for offset in (16 + 5 * 784 + 300, len(damaged) - 400):  # pixels of two images; the size stays the same
        damaged[offset] ^= 0xFF
    raw.write_bytes(bytes(damaged))
    capsys.readouterr()
    again = load_mnist(tmp_path, binarize="none", split="test").test_images
    assert torch.equal(again, clean)
    assert raw.read_bytes() != bytes(damaged)
    err = capsys.readouterr().err
    assert f"{raw} does not match its checksum" in err and "unpacking it again" in err


def test_damaged_cache_with_a_damaged_source_is_refused_by_name(tmp_path):
    _write_source(tmp_path / "src")
    load_mnist(tmp_path / "cache", source=tmp_path / "src")
    raw = tmp_path / "cache" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    raw.write_bytes(raw.read_bytes()[:-1] + b"\xff")  # a label of 255
    packed = tmp_path / "src" / "t10k-labels-idx1-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*checksum"):
        load_mnist(tmp_path / "cache", source=tmp_path / "src")


def test_source_whose_unpacked_bytes_differ_from_their_checksum_is_refused(tmp_path):
    arrays = _write_source(tmp_path / "src")
    sums = tmp_path / "src" / "SHA256SUMS"
    sums.write_text(sums.read_text().replace(hashlib.sha256(_idx(arrays["t10k-images-idx3-ubyte"])).hexdigest(),
                                             "0" * 64))
    with pytest.raises(DataError, match="unpacks to bytes that do not match the checksum of t10k-images-idx3-ubyte"):
        load_mnist(tmp_path / "cache", source=tmp_path / "src")
    assert not list((tmp_path / "cache" / "MNIST" / "raw").glob("t10k-images*"))


def test_test_split_alone_never_reads_the_training_files(tmp_path):
    arrays = _write_source(tmp_path / "src")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / "src" / f"{name}.gz").write_bytes(b"not gzip")  # corrupt: reading them would fail
    data = load_mnist(tmp_path / "cache", binarize="none", split="test", source=tmp_path / "src")
    assert torch.equal(data.test_images[:, 0], arrays["t10k-images-idx3-ubyte"].float() / 255)
    assert data.train_images.shape == (0, 1, 28, 28) and data.num_train == 0
    assert sorted(p.name for p in (tmp_path / "cache" / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    train_only = load_mnist(tmp_path / "cache2", binarize="none", split="train",
                            source=_write_source(tmp_path / "src2") and tmp_path / "src2")
    assert train_only.num_train == 20 and len(train_only.test_images) == 0
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path / "cache", split="both", source=tmp_path / "src")


def test_unusable_data_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot use /dev/null/MNIST/raw for MNIST"):
        load_mnist("/dev/null", split="test")


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


def test_download_mode_refuses_a_damaged_file_by_name(data_dir, tmp_path):
    """With --download, torchvision owns the files: a damaged one is named, not unpacked again."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:  # all present, so torchvision does not try the network
        (raw / name).symlink_to(data_dir / "MNIST" / "raw" / name)
    assert load_mnist(tmp_path, download=True, split="test", test_size=5).test_labels.tolist() == [7, 2, 1, 0, 4]
    damaged = bytearray((data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes())
    damaged[-1] ^= 0xFF
    (raw / "t10k-images-idx3-ubyte").unlink()
    (raw / "t10k-images-idx3-ubyte").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte does not match its checksum.*download it again"):
        load_mnist(tmp_path, download=True, split="test")


@pytest.mark.parametrize("name", FILES)
def test_idx_reader_reads_what_torchvision_reads(data_dir, name):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    from pyro_vae.data import read_idx

    path = data_dir / "MNIST" / "raw" / name
    expected = (read_image_file if "images" in name else read_label_file)(str(path))
    assert torch.equal(read_idx(path), expected.to(torch.uint8))


def test_idx_reader_refuses_other_formats(tmp_path):
    from pyro_vae.data import read_idx

    (tmp_path / "f").write_bytes(struct.pack(">I", 0x0D02) + struct.pack(">II", 2, 2) + bytes(16))  # floats
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "f")
