"""The trained runs that ship in pretrained/ load in seconds, from any directory, and are the runs their figures say."""

import math

import pytest
import torch

import pyro_vae
import pyro_vae.plot
from pyro_vae.data import MNIST_TEST, load_mnist
from pyro_vae.evaluate import elbo_per_image

# name: latent size, and the test ELBO its training reported on all 10,000 test images (pretrained/README.md)
SHIPPED = {"conv32": (32, -96.76), "latent2": (2, -157.20), "conv32_full": (32, -92.66),
           "best_cpu": (32, -87.75), "hierarchical": (32, -90.41),
           "ablation_prior_flow": (32, -88.64), "pixelcnn_flow_iaf": (32, -81.91)}


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_run_loads_from_anywhere(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "pretrained/NAME" names the shipped run, not a path under the working directory
    assert (pyro_vae.checkpoint.PRETRAINED / name / "checkpoint.pt").is_file(), f"pretrained/{name} is missing"
    run = pyro_vae.load(f"pretrained/{name}")
    assert run.config.latent_dim == SHIPPED[name][0] and run.epoch >= 1
    assert run.sample(4).shape == (4, 1, 28, 28)
    assert pyro_vae.plot.read_metrics(f"pretrained/{name}")[-1]["epoch"] == run.epoch  # its training curve too


@pytest.mark.slow  # two passes over the 10,000 test images
@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_run_has_its_test_elbo(name, data_dir):
    """The single-sample test ELBO on all 10,000 test images (binarized as training binarized them) is the figure
    training reported, within the Monte Carlo error of a draw of z per image on both sides."""
    run = pyro_vae.load(f"pretrained/{name}")
    x = load_mnist(data_dir, binarize=run.config.binarize, split="test").test_images
    assert len(x) == MNIST_TEST
    first, second = elbo_per_image(run.vae, x).double(), elbo_per_image(run.vae, x).double()  # two draws of z
    # the draws' noise: Var(first - second) = 2 Var(one draw per image); the reported figure had one draw too
    stderr_one_draw = (first - second).std().item() / math.sqrt(2 * len(x))
    stderr = math.sqrt(stderr_one_draw ** 2 / 2 + stderr_one_draw ** 2)  # the mean of our two, against theirs
    assert 0.01 < stderr < 0.2  # what a trained run's per-image spread gives: a check on the check
    reported = pyro_vae.plot.read_metrics(f"pretrained/{name}")[-1]["test_elbo"]
    assert reported == pytest.approx(SHIPPED[name][1], abs=0.005)
    assert ((first + second) / 2).mean().item() == pytest.approx(reported, abs=5 * stderr)
