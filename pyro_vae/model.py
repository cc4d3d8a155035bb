"""The probabilistic program: the generative story (model) and the amortized posterior (guide)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .likelihoods import make_likelihood
from .nets import make_nets
from .priors import make_prior


class VAE(nn.Module):
    """p(z) p(x | z) with q(z | x); `model` and `guide` are what SVI trains."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module, likelihood: nn.Module,
                 num_data: int | None = None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.prior, self.likelihood = prior, likelihood
        self.num_data = num_data  # size of the training set, so a minibatch estimates the whole-data ELBO

    def _data_plate(self, x: torch.Tensor) -> pyro.plate:
        # x is already a random minibatch: the plate only needs its size to scale log-probs by N / B.
        batch_size = x.shape[0]
        return pyro.plate("data", self.num_data or batch_size, dim=-1,
                          subsample=torch.arange(batch_size, device=x.device))

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """z ~ p(z); x ~ p(x | z) for each image x (B, 1, 28, 28)."""
        pyro.module("prior", self.prior)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with self._data_plate(x):
            z = pyro.sample("z", self.prior())  # (B, latent_dim)
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """q(z | x): a diagonal Gaussian whose parameters the encoder computes from x."""
        pyro.module("encoder", self.encoder)
        with self._data_plate(x):
            loc, scale = self.encoder(x)  # (B, latent_dim) each
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def build_vae(config, num_data: int | None = None) -> VAE:
    """The VAE that config describes, on the CPU (move it with .to(device))."""
    encoder, decoder = make_nets(config)
    return VAE(encoder, decoder, make_prior(config), make_likelihood(config), num_data)
