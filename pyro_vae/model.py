"""The probabilistic program: the generative story (model) and the amortized posterior (guide).

Variants are pieces this file uses, chosen by name from the Config: the prior (priors.py), the
likelihood (likelihoods.py) and the posterior family (guides.py). With `conditional`, a digit
label y joins the story: y ~ Uniform{0..9}, z ~ p(z | y), x ~ p(x | z, y); where y is not observed
the guide proposes it with a classifier q(y | x) and TraceEnum_ELBO sums over its ten values.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from .config import NUM_CLASSES
from .guides import make_posterior
from .likelihoods import make_likelihood
from .nets import make_classifier, make_nets
from .priors import make_prior


class VAE(nn.Module):
    """p(z) p(x | z) with q(z | x) (and, conditional, p(y) p(z | y) p(x | z, y) with q(y | x) q(z | x, y))."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module, likelihood: nn.Module,
                 posterior: nn.Module, classifier: nn.Module | None = None, *, conditional: bool = False,
                 num_data: int | None = None, classifier_weight: float = 0.0):
        super().__init__()
        self.encoder, self.decoder, self.posterior = encoder, decoder, posterior
        self.prior, self.likelihood, self.classifier = prior, likelihood, classifier
        self.conditional = conditional
        self.num_data = num_data  # size of the training set, so a minibatch estimates the whole-data ELBO
        self.kl_weight = 1.0  # beta (times the warm-up factor): scales log p(z) and log q(z | x) alike
        self.classifier_weight = classifier_weight  # weight of log q(y | x) on labelled images (Kingma M2)

    def _data_plate(self, x: torch.Tensor) -> pyro.plate:
        # x is already a random minibatch: the plate only needs its size to scale log-probs by N / B.
        batch_size = x.shape[0]
        return pyro.plate("data", self.num_data or batch_size, dim=-1,
                          subsample=torch.arange(batch_size, device=x.device))

    def _one_hot(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else F.one_hot(y, NUM_CLASSES).float()

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """z ~ p(z); x ~ p(x | z) for each image x (B, 1, 28, 28); conditional: y ~ p(y) first."""
        pyro.module("prior", self.prior)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        labels = y if self.conditional else None  # an unconditional model ignores labels
        y = None
        with self._data_plate(x):
            if self.conditional:
                uniform = torch.zeros(NUM_CLASSES, device=x.device)
                y = pyro.sample("y", dist.Categorical(logits=uniform), obs=labels)  # (B,), or enumerated (10, 1)
            with poutine.scale(scale=self.kl_weight):
                z = pyro.sample("z", self.prior(y))  # (B, latent_dim)
            pyro.sample("x", self.likelihood(self.decoder(z, self._one_hot(y))), obs=x)
            if self.classifier is not None and labels is not None and self.classifier_weight:
                # Kingma et al.'s extra term: on labelled images only, also fit q(y | x) to the label.
                # (Not on the enumerated y of unlabelled images: that would reward q(y | x) for
                # agreeing with itself and collapse it onto one class.)
                pyro.module("classifier", self.classifier)
                with poutine.scale(scale=self.classifier_weight):
                    pyro.sample("y_aux", dist.Categorical(logits=self.classifier(x)), obs=labels)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """q(z | x): the posterior family applied to the encoder's output; conditional: q(y | x) q(z | x, y)."""
        pyro.module("encoder", self.encoder)
        pyro.module("posterior", self.posterior)
        y = y if self.conditional else None
        with self._data_plate(x):
            if self.conditional and y is None:
                pyro.module("classifier", self.classifier)
                y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)),
                                infer={"enumerate": "parallel"})
            with poutine.scale(scale=self.kl_weight):
                pyro.sample("z", self.posterior(*self.encoder(x, self._one_hot(y))))


def build_vae(config, num_data: int | None = None) -> VAE:
    """The VAE that config describes, on the CPU (move it with .to(device))."""
    cond_dim = NUM_CLASSES if config.conditional else 0
    encoder, decoder = make_nets(config, cond_dim)
    semi_supervised = config.conditional and config.labels > 0
    classifier = make_classifier(config, NUM_CLASSES) if semi_supervised else None
    return VAE(encoder, decoder, make_prior(config, encoder), make_likelihood(config),
               make_posterior(config, encoder), classifier, conditional=config.conditional, num_data=num_data,
               classifier_weight=config.classifier_weight)
