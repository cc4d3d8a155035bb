"""The bits-back codec: lossless on MNIST, its length the model's -ELBO, and one line for every bad input."""

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

import processes
import pyro_vae
from pyro_vae import compress, priors
from pyro_vae.checkpoint import read_checkpoint, save_checkpoint
from pyro_vae.compress import BadImages, CompressError, batch_sizes, decode, encode, main, read_header
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import log_weights

ROOT = Path(__file__).resolve().parent.parent
RUN = "pretrained/conv32"


def mnist_test_images(data_dir, n: int) -> np.ndarray:
    """The first n test images as the codec's CLI takes them: binarized with the evaluation's seed, uint8 (n, 28, 28)."""
    return load_mnist(data_dir, split="test", test_size=n).test_images.reshape(n, 28, 28).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def conv32():
    return pyro_vae.load(RUN)


@pytest.fixture(scope="module")
def small_file(data_dir):
    """40 test images and noise, all-black and all-white images, coded in batches that ramp up to 4."""
    noise = (np.random.default_rng(0).random((3, 28, 28)) < 0.5).astype(np.uint8)
    images = np.concatenate([mnist_test_images(data_dir, 40), noise, np.zeros((1, 28, 28), np.uint8),
                             np.ones((1, 28, 28), np.uint8)])
    return images, encode(RUN, images, max_batch=4)


def test_the_round_trip_is_exact_through_the_batch_ramp(small_file):
    images, data = small_file
    assert len(set(batch_sizes(len(images), 12 * 32, 4))) > 2  # batches of 1, 2, 3 and 4 images were coded
    restored = decode(None, data)  # the run the file records
    assert restored.dtype == np.uint8 and restored.shape == images.shape
    np.testing.assert_array_equal(restored, images)


def test_the_file_records_its_run_and_the_weights(small_file, conv32):
    images, data = small_file
    header = read_header(data)
    assert header.run == RUN and header.num_images == len(images) and header.max_batch == 4
    assert header.weights_sha256 == compress.weights_sha256(conv32.vae)
    assert len(data) == header.size + 4 * header.data_words


def test_the_batches_ramp_from_one_image_and_cover_all():
    for n, working, cap in [(1, 384, 100), (10_000, 384, 100), (777, 64, 50), (5, 4096, 100)]:
        sizes = batch_sizes(n, working, cap)
        assert sum(sizes) == n and sizes[0] == 1 and max(sizes) <= cap
        assert sizes[:-1] == sorted(sizes[:-1])  # only the last batch may be cut short
        done = np.cumsum([0, *sizes[:-1]])
        # a batch pops at most what the seed (one image's worth) plus 64 bits per image already coded hold
        assert all(s * working <= working + d * compress.ASSUMED_BITS_PER_IMAGE for s, d in zip(sizes, done))


def test_decoding_with_other_weights_is_refused(small_file, tmp_path):
    _, data = small_file
    with pytest.raises(CompressError, match="weights of pretrained/latent2 differ"):
        decode("pretrained/latent2", data)
    # the run the file names, trained further after encoding: same path, other weights
    state = read_checkpoint(RUN)
    state["model"] = {k: v + 1e-6 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CompressError, match="differ"):
        decode(tmp_path, data)


@pytest.mark.parametrize("damage", ["truncated", "cut in the header", "one byte more", "foreign", "empty",
                                    "a bit flipped in the words", "another version"])
def test_a_damaged_or_foreign_file_is_refused_never_decoded_wrongly(small_file, damage):
    _, data = small_file
    header = read_header(data)
    flipped = bytearray(data)
    flipped[header.size + 4 * (header.data_words // 2)] ^= 0x10
    bad = {"truncated": data[:-4], "cut in the header": data[:50], "one byte more": data + b"\0",
           "foreign": (ROOT / "README.md").read_bytes(), "empty": b"", "a bit flipped in the words": bytes(flipped),
           "another version": data[:6] + bytes([99]) + data[7:]}[damage]
    with pytest.raises(CompressError):
        decode(None, bad)


@pytest.mark.parametrize("images, message", [
    (np.full((2, 28, 28), 2, np.uint8), "binary"),
    (np.zeros((2, 28, 27), np.uint8), "shape"),
    (np.zeros((28, 28), np.uint8), "shape"),
    (np.zeros((0, 28, 28), np.uint8), "shape"),
    (np.zeros((2, 28, 28), np.float32), "dtype"),
])
def test_images_that_are_not_binary_28_by_28_are_refused(images, message):
    with pytest.raises(BadImages, match=message):
        encode(RUN, images)


@pytest.mark.parametrize("change, flag", [
    (dict(prior="laplace"), "--prior laplace"),
    (dict(guide="iaf"), "--guide iaf"),
    (dict(likelihood="continuous-bernoulli", binarize="none"), "--likelihood continuous-bernoulli"),
    (dict(layers=2, upper_dims=[8]), "--layers 2"),
    (dict(conditional=True), "--conditional"),
])
def test_a_variant_the_codec_does_not_support_is_refused_naming_its_flag(change, flag):
    config = dataclasses.replace(pyro_vae.Config(latent_dim=4, conv_channels=(8, 16)), **change)
    run = pyro_vae.TrainedVAE(pyro_vae.build_vae(config), config)
    with pytest.raises(CompressError, match=f"cannot compress with this run: {flag}"):
        encode(run, np.zeros((1, 28, 28), np.uint8))


class WideNormal(priors.StandardNormal):
    """p(z) = Normal(0, 2^2 I): a normal, but not the one the bins are cut for."""

    def forward(self, y=None):
        return pyro.distributions.Normal(self.zero, 2.0).expand([self.latent_dim]).to_event(1)


def test_the_codec_asks_the_pieces_not_their_names(monkeypatch):
    monkeypatch.setitem(priors.PRIORS, "wide", WideNormal)  # priors added by one registry line each
    monkeypatch.setitem(priors.PRIORS, "unit", priors.StandardNormal)  # N(0, I) under another name
    for name, refused in (("wide", True), ("unit", False)):
        config = pyro_vae.Config(latent_dim=4, conv_channels=(8, 16), prior=name)
        reason = compress.unsupported(pyro_vae.TrainedVAE(pyro_vae.build_vae(config), config))
        assert (reason is not None and reason.startswith("--prior wide")) if refused else reason is None


# The command line


def _one_line(captured) -> str:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_the_cli_encodes_test_images_and_prints_the_figures(data_dir, tmp_path, capsys):
    file = tmp_path / "ten.pvae"
    assert main([RUN, str(file), "--limit", "10", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    for row in ("bits-back ANS (file)", "-ELBO (same images)", "overhead", "gzip -9", "bz2 -9", "lzma"):
        assert row in out
    assert main(["--decode", str(file), str(tmp_path / "ten.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "ten.npy"), mnist_test_images(data_dir, 10))


@pytest.mark.parametrize("precision", [8, 16])
def test_a_file_at_another_precision_decodes_with_its_own_through_the_api_and_the_cli(precision, data_dir, tmp_path,
                                                                                        capsys):
    """The bins per latent dimension are the file's: a decoder that used the default (2^12) would pop other bins."""
    assert precision != compress.PRECISION
    images = mnist_test_images(data_dir, 6)
    data = encode(RUN, images, precision=precision, max_batch=4)
    assert read_header(data).precision == precision
    np.testing.assert_array_equal(decode(None, data), images)

    file, out = tmp_path / "six.pvae", tmp_path / "six.npy"
    assert main([RUN, str(file), "--limit", "6", "--precision", str(precision), "--data-dir", str(data_dir)]) == 0
    assert read_header(file.read_bytes()).precision == precision
    assert main(["--decode", str(file), str(out)]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out), images)


@pytest.mark.parametrize("images, message", [
    (np.full((2, 28, 28), 3, np.uint8), "binary"), (np.zeros((2, 1, 28, 28), np.uint8), "shape"), (None, "not a .npy")])
def test_the_cli_refuses_bad_images_with_exit_2_and_one_line(images, message, tmp_path, capsys):
    path = tmp_path / "in.npy"
    if images is None:
        path.write_text("not numbers")
    else:
        np.save(path, images)
    assert main([RUN, str(tmp_path / "out.pvae"), "--images", str(path)]) == 2
    assert message in _one_line(capsys.readouterr())
    assert not (tmp_path / "out.pvae").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated"), ("foreign", "not a pyro_vae compressed file"), ("other run", "differ"),
    ("missing", "cannot read")])
def test_the_cli_refuses_a_bad_file_with_exit_1_and_one_line_and_writes_nothing(small_file, damage, message,
                                                                                  tmp_path, capsys):
    _, data = small_file
    file, out = tmp_path / "in.pvae", tmp_path / "out.npy"
    if damage != "missing":
        file.write_bytes({"truncated": data[:-8], "foreign": b"\x89PNG\r\n\x1a\n" + bytes(200),
                          "other run": data}[damage])
    extra = ["--run", "pretrained/latent2"] if damage == "other run" else []
    assert main(["--decode", str(file), str(out), *extra]) == 1
    line = _one_line(capsys.readouterr())
    assert line.startswith("error: ") and message in line
    assert not out.exists() and list(tmp_path.iterdir()) == ([file] if file.exists() else [])


def test_the_cli_refuses_an_unsupported_run_with_exit_1_and_one_line(tmp_path, capsys):
    config = pyro_vae.Config(latent_dim=4, conv_channels=(8, 16), prior="laplace")
    save_checkpoint(tmp_path / "checkpoint.pt", {"config": dataclasses.asdict(config),
                                                 "model": pyro_vae.build_vae(config).state_dict()})
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), np.uint8))
    assert main([str(tmp_path), str(tmp_path / "out.pvae"), "--images", str(tmp_path / "x.npy")]) == 1
    assert "--prior laplace" in _one_line(capsys.readouterr())


def test_an_interrupted_encode_writes_nothing(small_file, tmp_path, monkeypatch, capsys):
    images, _ = small_file
    np.save(tmp_path / "in.npy", images[:3])

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress, "_encode", interrupted)
    assert main([RUN, str(tmp_path / "out.pvae"), "--images", str(tmp_path / "in.npy")]) == 130
    assert "nothing written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]


# Slow: other processes, and a few hundred images


@pytest.fixture(scope="module")
def encoded_by_the_cli(data_dir, tmp_path_factory):
    """300 test images encoded by `python -m pyro_vae.compress` in a process of its own."""
    file = tmp_path_factory.mktemp("codec") / "test300.pvae"
    done = processes.run([sys.executable, "-m", "pyro_vae.compress", RUN, str(file), "--limit", "300",
                          "--data-dir", str(data_dir)], cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return data_dir, file


@pytest.mark.slow
def test_a_file_encoded_in_one_process_decodes_exactly_in_another(encoded_by_the_cli, tmp_path):
    data_dir, file = encoded_by_the_cli
    out = tmp_path / "restored.npy"
    done = processes.run([sys.executable, "-m", "pyro_vae.compress", "--decode", str(file), str(out)],
                         cwd=tmp_path, timeout=600)  # another directory, too
    assert done.returncode == 0, done.stderr
    restored = np.load(out)
    assert restored.dtype == np.uint8 and restored.shape == (300, 28, 28)
    np.testing.assert_array_equal(restored, mnist_test_images(data_dir, 300))


@pytest.mark.slow
def test_the_file_is_as_long_as_the_negative_elbo_plus_the_initial_bits(encoded_by_the_cli, conv32):
    """Bits-back codes each image in log q(z|x) - log p(x, z) bits at its z ~ q: the single-sample -ELBO.

    So the words after the initial bits are the sum of 300 such draws: expected sum_i -ELBO_i, with variance
    sum_i Var_q(log w_i). Both come from K draws per image; the tolerance is 5 standard errors, plus the
    0.5 bits an image that constriction's 2^-24 floor on each of q's bins may add (0.2 measured at 2^12 bins).
    """
    data_dir, file = encoded_by_the_cli
    data = file.read_bytes()
    header = read_header(data)
    x = torch.from_numpy(mnist_test_images(data_dir, 300)).float().unsqueeze(1)
    k = 10
    log_w = torch.cat([log_weights(conv32.vae, x[i:i + 100], num_samples=k) for i in range(0, 300, 100)], dim=1)
    minus_elbo = -log_w.double().mean(0) / math.log(2)  # bits, (300,)
    variance = log_w.double().var(0) / math.log(2) ** 2
    initial = 32 * (header.seed_words + 1)  # the seed and constriction's seal word
    coded = 32 * header.data_words - initial
    stderr = math.sqrt(variance.sum().item() * (1 + 1 / k))  # the coder's draws, and the K-draw estimate's
    excess = coded - minus_elbo.sum().item()
    assert -5 * stderr - 32 <= excess <= 5 * stderr + 32 + 0.5 * 300, (excess, stderr)
    assert coded <= 1.02 * minus_elbo.sum().item()  # the project's bar: within 2% of -ELBO past the initial bits
