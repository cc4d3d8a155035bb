"""Likelihoods p(x | z): each is an nn.Module that turns decoder output into a distribution over images.

Each returns one event per image (event shape (1, 28, 28)) and says which data it fits, so a
mismatch such as Bernoulli on grey values is refused before training. A new likelihood is one
class here and one line in LIKELIHOODS: `--likelihood NAME` then chooses it.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from .data import IMAGE_SHAPE
from .nets import PixelCNN

MIN_PIXEL_SCALE = 1e-3  # floor of the normal likelihood's scale: constant background pixels would drive it to 0


class Likelihood(nn.Module):
    """What every likelihood declares, and how it is built from the Config; config.py asks these."""

    fits = ()  # the --binarize settings whose data it models (empty: any)
    settings = ()  # Config fields that only this likelihood reads: setting one for another likelihood is refused

    @classmethod
    def from_config(cls, config) -> Likelihood:
        """This likelihood as config describes it."""
        return cls()

    @classmethod
    def decoder_channels(cls, config) -> int:
        """How many maps the decoder gives this likelihood: 1 (a parameter per pixel) unless it reads features."""
        return 1


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels; the decoder output is their logits."""

    fits = ("dynamic", "threshold")  # binary data only

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits).to_event(3)


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on grey values in [0, 1]."""

    fits = ("none",)

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(3)


class Normal(Likelihood):
    """Normal pixels around the decoder output with one learned scale: the "MSE loss" as a likelihood."""

    fits = ("none",)

    def __init__(self):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        scale = F.softplus(self.raw_scale) + MIN_PIXEL_SCALE
        return dist.Normal(loc, scale).to_event(3)


class AutoregressiveBernoulli(TorchDistribution):
    """p(x | z) = prod_i Bernoulli(x_i | x_<i, z) over the pixels in raster order: binary images (..., 1, 28, 28).

    `net(x, features)` gives every pixel's logit from the pixels before it and the decoder's feature map of z
    (..., C, 28, 28), so log_prob is one parallel pass over x; sample() fills an image pixel by pixel.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.boolean, 3)

    def __init__(self, net: PixelCNN, features: torch.Tensor, validate_args=None):
        self.net, self.features = net, features
        super().__init__(features.shape[:-3], torch.Size(IMAGE_SHAPE), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AutoregressiveBernoulli, _instance)
        new.net = self.net
        new.features = self.features.expand(*batch_shape, *self.features.shape[-3:])
        super(AutoregressiveBernoulli, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    def _flat_features(self, batch_shape) -> torch.Tensor:
        return self.features.expand(*batch_shape, *self.features.shape[-3:]).reshape(-1, *self.features.shape[-3:])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each pixel's logit given the pixels of x before it: (..., 1, 28, 28), one pass of the network."""
        batch = torch.broadcast_shapes(x.shape[:-3], self.batch_shape)
        flat_x = x.expand(*batch, *IMAGE_SHAPE).reshape(-1, *IMAGE_SHAPE)
        return self.net(flat_x, self._flat_features(batch)).reshape(*batch, *IMAGE_SHAPE)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(x)
        return dist.Bernoulli(logits=self.logits(x)).to_event(3).log_prob(x)  # each pixel given the ones before

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Images drawn pixel by pixel: x_i = 1 where u_i < sigmoid(logit_i given x_<i), u ~ Uniform(0, 1) per pixel."""
        shape = self._extended_shape(sample_shape)
        uniforms = torch.rand(shape[:-3].numel(), *IMAGE_SHAPE, device=self.features.device,
                              dtype=self.features.dtype)
        x = self.fill(lambda i, j, logit: (uniforms[:, 0, i, j] < torch.sigmoid(logit)).to(uniforms.dtype),
                      shape[:-3])
        return x.reshape(shape)

    @torch.no_grad()
    def fill(self, pixel, batch_shape=None) -> torch.Tensor:
        """The pixel loop: images (N, 1, 28, 28), N = batch_shape's size (default: this distribution's), filled in
        raster order with x[:, 0, i, j] = pixel(i, j, logit), where logit (N,) is pixel (i, j)'s given the pixels
        filled before it. sample() draws each pixel so; the codec (compress.py) pushes or pops it.

        Each logit comes from the network run on the pixel's receptive window alone (PixelCNN.logit_at), which
        gives the logit of the whole image's pass (zero padding only where the window meets the image's border).
        The pixels not yet filled are 0 in every window, so whoever fills the same pixels gets the same logits bit
        for bit, whatever the pixels to come.
        """
        features = self._flat_features(self.batch_shape if batch_shape is None else batch_shape)
        condition = self.net.condition(features)  # z's term in each layer, for the whole image at once
        x = torch.zeros(features.shape[0], *IMAGE_SHAPE, device=features.device, dtype=features.dtype)
        _, height, width = IMAGE_SHAPE
        for i in range(height):
            for j in range(width):
                x[:, 0, i, j] = pixel(i, j, self.net.logit_at(x, condition, i, j))
        return x


class PixelCNNBernoulli(Likelihood):
    """Bernoulli pixels, each given the pixels before it and z: a small PixelCNN on the decoder's feature map."""

    fits = ("dynamic", "threshold")
    settings = ("pixelcnn_channels", "pixelcnn_layers", "pixelcnn_kernel", "pixelcnn_gated")

    def __init__(self, channels: int, layers: int, kernel: int, gated: bool = False):
        super().__init__()
        self.net = PixelCNN(channels, layers, kernel, gated)

    @classmethod
    def from_config(cls, config) -> PixelCNNBernoulli:
        return cls(config.pixelcnn_channels, config.pixelcnn_layers, config.pixelcnn_kernel, config.pixelcnn_gated)

    @classmethod
    def decoder_channels(cls, config) -> int:
        return config.pixelcnn_channels

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        return AutoregressiveBernoulli(self.net, features)


def mean_or_draw(d: dist.Distribution) -> torch.Tensor:
    """The mean of p(x | z) where it has one in closed form, else one draw (the autoregressive likelihood's)."""
    try:
        return d.mean
    except NotImplementedError:
        return d.sample()


# --likelihood NAME chooses LIKELIHOODS[NAME]
LIKELIHOODS = {"bernoulli": Bernoulli, "continuous-bernoulli": ContinuousBernoulli, "normal": Normal,
               "pixelcnn": PixelCNNBernoulli}


def make_likelihood(config) -> Likelihood:
    """The likelihood that config names."""
    return LIKELIHOODS[config.likelihood].from_config(config)
