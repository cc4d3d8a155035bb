"""Data beyond binarized MNIST (docs/own_data.md): each form written in its real file format (PNG folders with PIL,
.npy/.npz arrays, gzipped IDX files with their header bytes), networks sized from the data, the discretized
logistic mixture, and the command line on them."""

import dataclasses
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pyro import poutine

import processes
from pyro_vae.checkpoint import load
from pyro_vae.compress import unsupported
from pyro_vae.config import Config
from pyro_vae.data import DataError
from pyro_vae.datasets import fill_config, load_data, load_idx_dataset, load_images
from pyro_vae.likelihoods import DiscretizedLogisticMixture
from pyro_vae.model import build_vae
from pyro_vae.nets import PixelCNN
from pyro_vae.trained import TrainedVAE

ROOT = Path(__file__).resolve().parent.parent
PYRO_VAE = Path(sys.executable).parent / "pyro-vae"
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")  # Fashion-MNIST's names (and MNIST's, and KMNIST's)


def write_png_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 12, side: int = 20,
                     mode: str = "RGB") -> dict[Path, np.ndarray]:
    """Class subfolders of PNGs, each class brightest in its own channel; returns each file's pixels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 128, (side, side, 3), dtype=np.uint8)
            pixels[..., c % 3] += 127
            if mode == "L":
                pixels = pixels[..., c % 3]
            Image.fromarray(pixels, mode=mode).save(root / name / f"{i:03d}.png")
            written[root / name / f"{i:03d}.png"] = pixels
    return written


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped: magic 0 0 8 ndim, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_fashion(folder: Path, train: int = 64, test: int = 32, side: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (train, side, side)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, side, side)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, test)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / f"{name}.gz", array)
    return arrays


# --data: a folder of images


def test_a_class_folder_of_rgb_pngs_gives_its_pixels_labels_and_a_fixed_split(tmp_path):
    written = write_png_folder(tmp_path / "pets")
    data = load_images(tmp_path / "pets", test_fraction=0.25, binarize="none")
    assert data.image_shape == (3, 20, 20) and data.num_classes == 3
    assert (data.num_train, len(data.test_images)) == (27, 9)
    # every image is one of the files, with its folder's label (classes in sorted order, as ImageFolder's)
    files = {tuple(np.asarray(p).ravel()): ["cat", "dog", "owl"].index(path.parent.name)
             for path, p in written.items()}
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        for x, y in zip(images, labels):
            key = tuple(x.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy().ravel())
            assert files[key] == y
    again = load_images(tmp_path / "pets", test_fraction=0.25, binarize="none")
    assert torch.equal(again.test_images, data.test_images)  # the split does not move


def test_a_flat_grey_folder_is_unlabelled_and_resized(tmp_path):
    write_png_folder(tmp_path / "raw", classes=("only",), per_class=10, side=40, mode="L")
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "raw" / "only").iterdir():
        p.rename(flat / p.name)
    data = load_images(flat, image_size=16, test_fraction=0.2)
    assert data.image_shape == (1, 16, 16) and data.num_classes == 1
    assert set(data.train_labels.tolist()) == {0}


def test_images_of_other_sizes_or_sides_out_of_range_are_one_line_naming_image_size(tmp_path):
    write_png_folder(tmp_path / "small", side=8)
    with pytest.raises(DataError, match="--image-size"):
        load_images(tmp_path / "small")
    assert load_images(tmp_path / "small", image_size=16).image_shape == (3, 16, 16)
    with pytest.raises(DataError, match="not a folder of images"):
        load_images(tmp_path / "nothing-here")


# --data: arrays


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_an_npy_array_in_any_layout_uint8_or_float_gives_the_same_images(tmp_path, layout):
    rng = np.random.default_rng(2)
    channels = 1 if layout == "NHW" else 3
    nchw = rng.integers(0, 256, (30, channels, 18, 18)).astype(np.uint8)
    array = {"NHW": nchw[:, 0], "NHWC": nchw.transpose(0, 2, 3, 1), "NCHW": nchw}[layout]
    np.save(tmp_path / "bytes.npy", array)
    np.save(tmp_path / "floats.npy", array.astype(np.float32) / 255)
    expected = torch.from_numpy(nchw).float() / 255
    for name in ("bytes.npy", "floats.npy"):
        data = load_images(tmp_path / name, test_fraction=0.1, binarize="none")
        assert data.image_shape == (channels, 18, 18)
        got = torch.cat([data.train_images, data.test_images])
        assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(map(tuple, expected.flatten(1).tolist()))


def test_float_pixels_between_the_levels_round_to_the_nearest_level(tmp_path):
    """k + 0.4 and k + 0.6 (over 255) become levels k and k + 1: rounded, not truncated."""
    k = np.arange(255, dtype=np.float64)
    values = np.concatenate([(k + 0.4) / 255, (k + 0.6) / 255, np.zeros(4 * 256 - 510)])
    np.save(tmp_path / "floats.npy", values.reshape(4, 16, 16))
    data = load_images(tmp_path / "floats.npy", test_fraction=0.25, binarize="none")
    got = torch.cat([data.train_images, data.test_images]).flatten() * 255
    expected = np.concatenate([k, k + 1, np.zeros(4 * 256 - 510)])
    assert sorted(got.round().tolist()) == sorted(expected.tolist())


def test_an_npz_with_labels_is_labelled_and_bad_arrays_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "set.npz", x=rng.random((40, 3, 16, 16)), y=np.arange(40) % 4)
    data = load_images(tmp_path / "set.npz")
    assert data.num_classes == 4 and data.image_shape == (3, 16, 16)
    assert torch.equal(torch.cat([data.train_labels, data.test_labels]).sort().values,
                       torch.arange(40).remainder(4).sort().values)
    np.save(tmp_path / "bright.npy", rng.random((20, 16, 16)) * 2)
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        load_images(tmp_path / "bright.npy")
    np.save(tmp_path / "five.npy", rng.random((20, 16, 16, 5)))
    with pytest.raises(DataError, match="shape"):
        load_images(tmp_path / "five.npy")


# --dataset fashion-mnist: IDX files


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_idx_files_are_read_in_either_layout(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_fashion(folder)
    data = load_idx_dataset("fashion-mnist", tmp_path, binarize="none")
    assert torch.equal(data.train_images.mul(255).round().to(torch.uint8)[:, 0],
                       torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert torch.equal(data.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


def test_a_dataset_with_no_files_says_where_it_looked_and_what_to_put_there(tmp_path):
    with pytest.raises(DataError) as error:
        load_idx_dataset("kmnist", tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and str(tmp_path / "KMNIST" / "raw") in message
    assert "t10k-images-idx3-ubyte.gz" in message and "--download" in message and "\n" not in message


# networks and the model, sized from the data


@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 20, 20), (3, 32, 32), (1, 64, 48), (3, 30, 17)])
def test_the_model_runs_at_each_shape_and_its_trace_checks(arch, shape):
    config = Config(arch=arch, latent_dim=4, conv_channels=(8, 16), hidden_dim=32, image_shape=shape, num_classes=3,
                    conditional=True, binarize="none", likelihood="logistic-mixture", logistic_components=2)
    vae = build_vae(config)
    x = torch.randint(0, 256, (5, *shape)).float() / 255
    y = torch.randint(0, 3, (5,))
    guide = poutine.trace(vae.guide).get_trace(x, y)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, y)
    model.compute_log_prob()  # Pyro's checks of shapes and supports (validation is on)
    assert model.nodes["x"]["log_prob"].shape == (5,) and torch.isfinite(model.nodes["x"]["log_prob"]).all()
    assert TrainedVAE(vae, config).sample_grid(2).shape == (6, *shape)


def test_an_old_config_is_mnist_and_the_default_networks_are_todays():
    old = Config.from_dict({k: v for k, v in Config().to_dict().items()
                            if k not in ("image_shape", "num_classes", "dataset", "data")})
    assert old.shape() == (1, 28, 28) and old.classes() == 10
    shapes = {k: tuple(v.shape) for k, v in build_vae(Config()).state_dict().items()}
    assert shapes["encoder.features.0.weight"] == (32, 1, 3, 3)
    assert shapes["decoder.body.0.weight"] == (32 * 7 * 7, 32)  # (c1 * 7 * 7, latent_dim)
    assert shapes["decoder.body.7.weight"] == (32, 1, 3, 3) and "decoder.body.8.weight" not in shapes


def test_fill_config_writes_the_datas_shape_and_refuses_a_cvae_without_labels(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((20, 16, 16), dtype=np.uint8))
    config = Config(data=str(tmp_path / "plain.npy"), batch_size=8)
    fill_config(config, load_data(config))
    assert (config.shape(), config.num_classes) == ((1, 16, 16), 1)
    with pytest.raises(DataError, match="--conditional needs labelled images"):
        fill_config(dataclasses.replace(config, conditional=True, num_classes=0), load_data(config))
    assert any(p.startswith("--image-size needs --data") for p in Config(image_size=32, device="cpu").errors())


# the discretized logistic mixture


@pytest.mark.parametrize("channels", [1, pytest.param(3, marks=pytest.mark.slow)])  # RGB: all 256^3 colours, minutes
def test_the_logistic_mixture_puts_probability_one_on_the_256_levels_of_each_pixel(channels):
    components = 3
    params = 3 * torch.randn(2, DiscretizedLogisticMixture.parameters_per_pixel(channels, components), 1, 1,
                             dtype=torch.float64)
    d = DiscretizedLogisticMixture(params, channels, components)
    levels = torch.arange(256, dtype=torch.float64) / 255
    if channels == 1:
        total = torch.logsumexp(d.log_prob(levels.view(256, 1, 1, 1, 1)), 0)
    else:  # all 256^3 colours, one red level at a time
        gb = torch.cartesian_prod(levels, levels)
        total = torch.logsumexp(torch.stack([
            torch.logsumexp(d.log_prob(torch.cat([r.expand(len(gb), 1), gb], 1).view(-1, 1, 3, 1, 1)), 0)
            for r in levels]), 0)
    assert torch.allclose(total, torch.zeros(2, dtype=torch.float64), atol=1e-10)  # float64 rounding of 256^3 terms
    draws = d.sample((50,))
    assert draws.shape == (50, 2, channels, 1, 1) and torch.equal(draws, (draws * 255).round() / 255)


def test_a_pixelcnn_of_rgb_images_reads_only_the_pixels_before_each():
    net = PixelCNN(8, 2, 3, image_channels=3)
    x, features = torch.rand(1, 3, 16, 16, requires_grad=True), torch.randn(1, 8, 16, 16)
    net(x, features)[0, :, 5, 7].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0  # (16, 16)
    after = torch.ones(16, 16, dtype=torch.bool).flatten()
    after[:5 * 16 + 7] = False
    assert not seen.flatten()[after].any()  # not the pixel itself nor any after it, in any channel


# the command line


def _run(*argv):
    return processes.run([str(a) for a in argv], cwd=ROOT, timeout=600)


def _train_evaluate_plot(run: Path, *flags) -> None:
    trained = _run(PYRO_VAE, "train", *flags, "--epochs", "1", "--batch-size", "8", "--latent-dim", "4",
                   "--conv-channels", "8", "16", "--device", "cpu", "--out", run)
    assert trained.returncode == 0 and "Traceback" not in trained.stderr, trained.stderr
    evaluated = _run(PYRO_VAE, "evaluate", run, "--k", "3", "--device", "cpu")
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.stderr, evaluated.stderr
    assert "bits per dimension" in evaluated.stdout
    plotted = _run(PYRO_VAE, "plot", run)
    assert plotted.returncode == 0 and "Traceback" not in plotted.stderr, plotted.stderr
    assert (run / "plots" / "latent_scatter.png").is_file()


@pytest.mark.slow
def test_an_rgb_png_class_folder_trains_evaluates_and_plots_from_the_cli(tmp_path):
    write_png_folder(tmp_path / "pets")
    _train_evaluate_plot(tmp_path / "run", "--data", tmp_path / "pets")
    assert load(tmp_path / "run").config.shape() == (3, 20, 20)
    _train_evaluate_plot(tmp_path / "cvae", "--data", tmp_path / "pets", "--conditional")
    assert (tmp_path / "cvae" / "plots" / "digit_rows.png").is_file()
    refused = unsupported(load(tmp_path / "run"))
    assert refused and "3 x 20 x 20" in refused


@pytest.mark.slow
def test_an_rgb_npy_trains_evaluates_and_plots_with_the_logistic_mixture_and_the_pixelcnn(tmp_path):
    np.save(tmp_path / "rgb.npy", np.random.default_rng(4).integers(0, 256, (40, 16, 16, 3)).astype(np.uint8))
    _train_evaluate_plot(tmp_path / "run", "--data", tmp_path / "rgb.npy", "--binarize", "none",
                         "--likelihood", "logistic-mixture", "--logistic-components", "2")
    bits = [line for line in _run(PYRO_VAE, "evaluate", tmp_path / "run", "--k", "2").stdout.splitlines()
            if line.strip().startswith("-ELBO")]
    assert 0 < float(bits[0].split()[1]) < 16  # random bytes: about 8 bits per dimension
    _train_evaluate_plot(tmp_path / "pixelcnn", "--data", tmp_path / "rgb.npy", "--likelihood", "pixelcnn",
                         "--pixelcnn-channels", "4", "--pixelcnn-layers", "1")


@pytest.mark.slow
def test_fashion_mnist_files_in_data_dir_train_and_no_files_is_one_line_exit_1(tmp_path):
    write_fashion(tmp_path / "fashion", train=64, test=16)
    run = tmp_path / "run"
    trained = _run(PYRO_VAE, "train", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "fashion",
                   "--epochs", "1", "--batch-size", "16", "--latent-dim", "4", "--device", "cpu", "--out", run)
    assert trained.returncode == 0, trained.stderr
    assert load(run).config.dataset == "fashion-mnist"
    missing = _run(PYRO_VAE, "train", "--dataset", "kmnist", "--data-dir", tmp_path / "empty", "--device", "cpu",
                   "--out", tmp_path / "none")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "kmnist" in errors[0] and str(tmp_path / "empty") in errors[0]


@pytest.mark.slow
def test_the_cvae_folder_experiment_trains_a_cvae_and_a_classifier_on_a_png_class_folder(tmp_path, data_dir,
                                                                                          monkeypatch):
    # experiments/cvae_folder.py at tiny scale: the CVAE bar on a labelled PNG folder (docs/own_data.md)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "experiments"))
    from cvae_folder import folder_recognition
    from make_digit_folder import write_digit_folder

    folder = write_digit_folder(tmp_path / "digits", 1000, str(data_dir))
    figures = folder_recognition(folder, tmp_path / "run", epochs=300, per_class=20)  # 2,100 steps, about a minute
    assert figures["samples"] == 200 and figures["train_images"] + figures["test_images"] == 1000
    assert figures["classifier_test_accuracy"] > 0.6  # ten classes: chance is 0.1; measured 0.83 and 0.85
    # measured 0.79 and 0.83 (seeds 0 and 1); samples that ignored their label would be recognised about 0.1 of
    # the time (the binomial spread of 200 samples is 0.03)
    assert figures["recognition"] > 0.5
