"""The trained runs that ship in pretrained/ load in seconds, from any directory, and are trained."""

import pytest
import torch

import pyro_vae
import pyro_vae.plot
from pyro_vae.data import load_mnist
from pyro_vae.evaluate import elbo_per_image

SHIPPED = {"conv32": 32, "latent2": 2}  # name: latent size


@pytest.mark.parametrize("name", [n for n in SHIPPED if (pyro_vae.checkpoint.PRETRAINED / n).is_dir()])
def test_a_shipped_run_loads_from_anywhere_and_beats_an_untrained_model(name, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "pretrained/NAME" names the shipped run, not a path under the working directory
    run = pyro_vae.load(f"pretrained/{name}")
    assert run.config.latent_dim == SHIPPED[name] and run.epoch >= 1
    x = load_mnist(data_dir, split="test", test_size=200).test_images
    torch.manual_seed(0)
    trained = elbo_per_image(run.vae, x).mean().item()
    untrained = elbo_per_image(pyro_vae.build_vae(run.config), x).mean().item()
    assert trained > untrained + 100  # an untrained conv VAE sits near -545 nats, a trained one above -170
    assert run.sample(4).shape == (4, 1, 28, 28)
    assert pyro_vae.plot.read_metrics(f"pretrained/{name}")[-1]["epoch"] == run.epoch  # its training curve too


def test_conv32_is_shipped():
    assert (pyro_vae.checkpoint.PRETRAINED / "conv32" / "checkpoint.pt").is_file()
