"""The probabilistic program: the generative story (model) and the amortized posterior (guide).

Variants are pieces this file uses, chosen by name from the Config: the prior (priors.py), the
likelihood (likelihoods.py) and the posterior family (guides.py). With `conditional`, a digit
label y joins the story: y ~ Uniform{0..9}, z ~ p(z | y), x ~ p(x | z, y); where y is not observed
the guide proposes it with a classifier q(y | x) and TraceEnum_ELBO sums over its ten values.
With `layers` L >= 2 the latent is a chain z_L -> ... -> z_2 -> z -> x, each step a diagonal Gaussian
from a small network (Burda et al. 2015; Sonderby et al. 2016 for the ladder guide).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN, ConditionalDenseNN, DenseNN
from torch import nn
from torch.nn import functional as F

from .guides import make_posterior, precision_weighted
from .likelihoods import LIKELIHOODS, make_likelihood
from .nets import (Classifier, Decoder, Encoder, GaussianLayer, PixelCNN, ladder_pass, make_classifier,
                   make_hierarchy_nets, make_nets)
from .priors import make_prior


def latent_sites(layers: int) -> tuple[str, ...]:
    """Site names of z_1 .. z_L: "z" for the layer next to x, so one layer is today's model and everything
    that reads site "z" (evaluate's grids, plot) reads the layer the decoder sees; "z2", "z3", ... above."""
    return ("z", *(f"z{l}" for l in range(2, layers + 1)))


class VAE(nn.Module):
    """p(z) p(x | z) with q(z | x) (and, conditional, p(y) p(z | y) p(x | z, y) with q(y | x) q(z | x, y))."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module, likelihood: nn.Module,
                 posterior: nn.Module, classifier: nn.Module | None = None, *, conditional: bool = False,
                 num_data: int | None = None, classifier_weight: float = 0.0, top_down: nn.ModuleList | None = None,
                 bottom_up: nn.ModuleList | None = None, ladder: bool = False, num_classes: int = 10):
        super().__init__()
        self.encoder, self.decoder, self.posterior = encoder, decoder, posterior
        self.prior, self.likelihood, self.classifier = prior, likelihood, classifier
        self.conditional = conditional
        self.num_classes = num_classes  # of the label y, with conditional
        self.num_data = num_data  # size of the training set, so a minibatch estimates the whole-data ELBO
        self.kl_weight = 1.0  # beta (times the warm-up factor; 0 under free bits): on log p(z) and log q(z | x) alike
        self.classifier_weight = classifier_weight  # weight of log q(y | x) on labelled images (Kingma M2)
        # between the layers: top_down[l-1] gives p(z_l | z_l+1), bottom_up[l-1] q(z_l+1 | z_l) or the ladder's
        # rung l; empty with one layer (no parameters, so one layer's state_dict is the plain VAE's)
        self.top_down = top_down if top_down is not None else nn.ModuleList()
        self.bottom_up = bottom_up if bottom_up is not None else nn.ModuleList()
        self.ladder = ladder
        self.sites = latent_sites(len(self.top_down) + 1)
        self._arange: dict[tuple, torch.Tensor] = {}
        self.declare_modules = True  # pyro.module in model and guide; False inside modules_declared()

    @contextmanager
    def modules_declared(self):
        """model and guide leave out their pyro.module statements inside. Those statements are how Pyro's own
        optimizers (pyro.optim) find the parameters; SVIStep steps vae.parameters() itself, so it runs its
        steps after the first (which declared them) in here: a dozen parameter sites fewer each call."""
        self.declare_modules = False
        try:
            yield
        finally:
            self.declare_modules = True

    def _latent_weight(self):
        """The KL weight on every layer's log p(z_l | ...) and log q(z_l | ...): a poutine.scale; a weight of 0 (free
        bits, under the floor) a poutine.mask, as Pyro asks in place of a scale of 0."""
        if not torch.is_tensor(self.kl_weight) and self.kl_weight == 0:
            return poutine.mask(mask=False)
        return poutine.scale(scale=self.kl_weight)

    def _data_plate(self, x: torch.Tensor) -> pyro.plate:
        # x is already a random minibatch: the plate only needs its size to scale log-probs by N / B. Told the
        # device, Pyro's plate does not make a tensor in every call to find it.
        batch_size = x.shape[0]
        return pyro.plate("data", self.num_data or batch_size, dim=-1, subsample=self._positions(batch_size, x.device),
                          device=x.device)

    def _positions(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """0 .. B-1, made once per batch size and device rather than by a kernel in every model and guide call."""
        key = (batch_size, device)
        if key not in self._arange:
            self._arange[key] = torch.arange(batch_size, device=device)
        return self._arange[key]

    def _one_hot(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else F.one_hot(y, self.num_classes).float()

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """z ~ p(z); x ~ p(x | z) for each image x (B, C, H, W); conditional: y ~ p(y) first; with L layers
        z_L ~ p(z_L), then z_l ~ p(z_l | z_l+1) down to z (= z_1)."""
        if self.declare_modules:  # how Pyro's own optimizers find the parameters (see modules_declared)
            pyro.module("prior", self.prior)
            pyro.module("decoder", self.decoder)
            pyro.module("likelihood", self.likelihood)
            pyro.module("top_down", self.top_down)
        labels = y if self.conditional else None  # an unconditional model ignores labels
        y = None
        with self._data_plate(x):
            if self.conditional:
                uniform = torch.zeros(self.num_classes, device=x.device)
                y = pyro.sample("y", dist.Categorical(logits=uniform), obs=labels)  # (B,), or enumerated (10, 1)
            with self._latent_weight():  # beta on every layer
                z = pyro.sample(self.sites[-1], self.prior(y))  # the top layer z_L: (B, its width)
                for site, net in zip(reversed(self.sites[:-1]), reversed(self.top_down)):
                    z = pyro.sample(site, dist.Normal(*net(z)).to_event(1))  # z_l ~ p(z_l | z_l+1)
            pyro.sample("x", self.likelihood(self.decoder(z, self._one_hot(y))), obs=x)
            if self.classifier is not None and labels is not None and self.classifier_weight:
                # Kingma et al.'s extra term: on labelled images only, also fit q(y | x) to the label.
                # (Not on the enumerated y of unlabelled images: that would reward q(y | x) for
                # agreeing with itself and collapse it onto one class.)
                if self.declare_modules:
                    pyro.module("classifier", self.classifier)
                with poutine.scale(scale=self.classifier_weight):
                    pyro.sample("y_aux", dist.Categorical(logits=self.classifier(x)), obs=labels)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """q(z | x): the posterior family applied to the encoder's output; conditional: q(y | x) q(z | x, y); with L
        layers q(z | x) q(z2 | z) ... bottom-up, or the ladder's top-down q(z_L | x) ... q(z | z2, x)."""
        if self.declare_modules:
            pyro.module("encoder", self.encoder)
            pyro.module("posterior", self.posterior)
            pyro.module("bottom_up", self.bottom_up)
        y = y if self.conditional else None
        with self._data_plate(x):
            if self.conditional and y is None:
                if self.declare_modules:
                    pyro.module("classifier", self.classifier)
                y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)),
                                infer={"enumerate": "parallel"})
            with self._latent_weight():
                if self.ladder:
                    self._ladder_guide(x)
                    return
                z = pyro.sample("z", self.posterior(*self.encoder(x, self._one_hot(y))))
                for site, net in zip(self.sites[1:], self.bottom_up):
                    z = pyro.sample(site, dist.Normal(*net(z)).to_event(1))  # z_l+1 ~ q(z_l+1 | z_l)

    def _ladder_guide(self, x: torch.Tensor) -> None:
        """q(z_L | x) from the bottom-up pass, then top-down: q(z_l | z_l+1, x) merges, by precision, the pass's
        Gaussian for z_l with the model's own p(z_l | z_l+1) (Sonderby et al. 2016): the top-down nets are shared."""
        if self.declare_modules:
            pyro.module("top_down", self.top_down)
        up = ladder_pass(self.encoder, self.bottom_up, x)  # (loc, scale) for z_1 .. z_L
        z = pyro.sample(self.sites[-1], dist.Normal(*up[-1]).to_event(1))
        for site, net, (loc, scale) in zip(reversed(self.sites[:-1]), reversed(self.top_down), reversed(up[:-1])):
            z = pyro.sample(site, self.posterior(*precision_weighted(loc, scale, *net(z))))


def build_vae(config, num_data: int | None = None) -> VAE:
    """The VAE that config describes, on the CPU (move it with .to(device))."""
    cond_dim = config.classes() if config.conditional else 0
    encoder, decoder = make_nets(config, cond_dim, LIKELIHOODS[config.likelihood].decoder_channels(config))
    semi_supervised = config.conditional and config.labels > 0
    classifier = make_classifier(config, config.classes()) if semi_supervised else None
    top_down, bottom_up = make_hierarchy_nets(config)
    prior = make_prior(config, encoder) if config.layers == 1 else _top_prior(config, encoder, bottom_up)
    posterior = make_posterior(config, encoder)
    vae = VAE(encoder, decoder, prior, make_likelihood(config), posterior,
              classifier, conditional=config.conditional, num_data=num_data,
              classifier_weight=config.classifier_weight, top_down=top_down, bottom_up=bottom_up,
              ladder=posterior.top_down, num_classes=config.classes())
    vae = _convolutions_in_device_layout(vae)  # the one place the layout is chosen (MEMORY_FORMAT)
    return _outputs_in_fp32(vae)  # the one boundary between bf16 networks and fp32 distributions


# The memory layout the networks' convolutions run in, per type of device. On the CPU oneDNN's kernels run faster
# channels-last, in training and in evaluation (docs/speed.md); elsewhere the input stays as it comes. Only the
# activations change layout: the parameters keep torch's, so Pyro's param store holds the very tensors Adam steps
# (it would keep a contiguous copy of a channels-last one) and checkpoints do not depend on it.
MEMORY_FORMAT = {"cpu": torch.channels_last}


def _input_in_layout(conv: nn.Module, args: tuple) -> tuple | None:
    """A convolution's forward pre-hook: its input (N, C, H, W) in MEMORY_FORMAT's layout for the input's device.

    The strides decide which kernel torch picks; a one-channel image is contiguous in both layouts, but only a
    channel stride of 1 picks channels-last. Once in the layout, the activations of later layers stay in it.
    """
    x, *rest = args
    layout = MEMORY_FORMAT.get(x.device.type)
    if layout is None or x.dim() != 4:
        return None
    n, c, h, w = x.shape
    strides = (c * h * w, 1, w * c, c) if layout == torch.channels_last else (c * h * w, h * w, w, 1)
    if x.stride() == strides:
        return None
    return (torch.empty_like(x, memory_format=layout).copy_(x), *rest)


def _convolutions_in_device_layout(vae: nn.Module) -> nn.Module:
    """vae, every 2-D convolution in it taking its input in the layout of the input's device (MEMORY_FORMAT)."""
    for module in vae.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.register_forward_pre_hook(_input_in_layout)
    return vae


# The networks whose outputs become the parameters of a distribution: under bf16 autocast (precision.py) they
# compute in bf16, and their outputs are cast back to fp32 here, so every log-prob Pyro sums, the ELBO, the guide's
# scale and every KL are fp32. Pyro's own networks are those of the iaf guide and the flow prior's transforms.
NETWORKS = (Encoder, Decoder, GaussianLayer, Classifier, PixelCNN,
            AutoRegressiveNN, ConditionalAutoRegressiveNN, DenseNN, ConditionalDenseNN)


def _in_fp32(output):
    """A network's output (a tensor or a tuple of them), each half-precision tensor in fp32 (fp32 and fp64 ones, as
    the float64 tests run, stay as they are)."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype in (torch.bfloat16, torch.float16) else output
    if isinstance(output, tuple):
        return tuple(_in_fp32(t) for t in output)
    return output


def _outputs_in_fp32(vae: nn.Module) -> nn.Module:
    """vae, the output of each of its NETWORKS cast to fp32 (the outermost only: a network inside one keeps its
    dtype, so bf16 runs through the network whole)."""
    def outermost(module: nn.Module, inside: bool = False):
        for child in module.children():
            if isinstance(child, NETWORKS) and not inside:
                child.register_forward_hook(lambda m, args, output: _in_fp32(output))
                yield child
            yield from outermost(child, inside or isinstance(child, NETWORKS))
    list(outermost(vae))
    return vae


def _top_prior(config, encoder: nn.Module, bottom_up: nn.ModuleList) -> nn.Module:
    """p(z_L): --prior at the top layer's width; the VampPrior's q(z_L | u) is the top of the ladder's pass."""
    top = dataclasses.replace(config, latent_dim=config.layer_dims()[-1])
    return make_prior(top, lambda u: ladder_pass(encoder, bottom_up, u)[-1])
