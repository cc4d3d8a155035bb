"""Likelihoods p(x | z): each is an nn.Module that turns decoder output into a distribution over images.

Each returns one event per image (event shape (C, H, W)) and says which data it fits, so a
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
        """How many maps the decoder gives this likelihood: one per image channel (a parameter per pixel) unless
        it reads features or has more parameters."""
        return config.shape()[0]


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
    """p(x | z) = prod_i Bernoulli(x_i | x_<i, z) over the pixels in raster order: binary images (..., I, H, W).

    `net(x, features)` gives every pixel's logit from the pixels before it and the decoder's feature map of z
    (..., C, H, W), so log_prob is one parallel pass over x; sample() fills an image pixel by pixel.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.boolean, 3)

    def __init__(self, net: PixelCNN, features: torch.Tensor, validate_args=None):
        self.net, self.features = net, features
        image_shape = torch.Size((net.out.out_channels, *features.shape[-2:]))
        super().__init__(features.shape[:-3], image_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(AutoregressiveBernoulli, _instance)
        new.net = self.net
        new.features = self.features.expand(*batch_shape, *self.features.shape[-3:])
        super(AutoregressiveBernoulli, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        return new

    def _flat_features(self, batch_shape) -> torch.Tensor:
        return self.features.expand(*batch_shape, *self.features.shape[-3:]).reshape(-1, *self.features.shape[-3:])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each pixel's logit given the pixels of x before it: (..., I, H, W), one pass of the network."""
        batch = torch.broadcast_shapes(x.shape[:-3], self.batch_shape)
        flat_x = x.expand(*batch, *self.event_shape).reshape(-1, *self.event_shape)
        return self.net(flat_x, self._flat_features(batch)).reshape(*batch, *self.event_shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(x)
        return dist.Bernoulli(logits=self.logits(x)).to_event(3).log_prob(x)  # each pixel given the ones before

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Images drawn pixel by pixel: x_i = 1 where u_i < sigmoid(logit_i given x_<i), u ~ Uniform(0, 1) per pixel."""
        shape = self._extended_shape(sample_shape)
        uniforms = torch.rand(shape[:-3].numel(), *self.event_shape, device=self.features.device,
                              dtype=self.features.dtype)
        x = self.fill(lambda i, j, logit: (uniforms[:, :, i, j].reshape(logit.shape) < torch.sigmoid(logit)
                                           ).to(uniforms.dtype), shape[:-3])
        return x.reshape(shape)

    @torch.no_grad()
    def fill(self, pixel, batch_shape=None) -> torch.Tensor:
        """The pixel loop: images (N, I, H, W), N = batch_shape's size (default: this distribution's), filled in
        raster order with x[:, :, i, j] = pixel(i, j, logit), where logit (N,) (with I > 1 channels, (N, I)) is
        pixel (i, j)'s given the pixels filled before it. sample() draws each pixel so; the codec (compress.py)
        pushes or pops it.

        Each logit comes from the network run on the pixel's receptive window alone (PixelCNN.logit_at), which
        gives the logit of the whole image's pass (zero padding only where the window meets the image's border).
        The pixels not yet filled are 0 in every window, so whoever fills the same pixels gets the same logits bit
        for bit, whatever the pixels to come.
        """
        features = self._flat_features(self.batch_shape if batch_shape is None else batch_shape)
        condition = self.net.condition(features)  # z's term in each layer, for the whole image at once
        x = torch.zeros(features.shape[0], *self.event_shape, device=features.device, dtype=features.dtype)
        _, height, width = self.event_shape
        for i in range(height):
            for j in range(width):
                x[:, :, i, j] = pixel(i, j, self.net.logit_at(x, condition, i, j)).reshape(len(x), -1)
        return x


class PixelCNNBernoulli(Likelihood):
    """Bernoulli pixels, each given the pixels before it and z: a small PixelCNN on the decoder's feature map."""

    fits = ("dynamic", "threshold")
    settings = ("pixelcnn_channels", "pixelcnn_layers", "pixelcnn_kernel", "pixelcnn_gated")

    def __init__(self, channels: int, layers: int, kernel: int, gated: bool = False, image_channels: int = 1):
        super().__init__()
        self.net = PixelCNN(channels, layers, kernel, gated, image_channels)

    @classmethod
    def from_config(cls, config) -> PixelCNNBernoulli:
        return cls(config.pixelcnn_channels, config.pixelcnn_layers, config.pixelcnn_kernel, config.pixelcnn_gated,
                   config.shape()[0])

    @classmethod
    def decoder_channels(cls, config) -> int:
        return config.pixelcnn_channels

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        return AutoregressiveBernoulli(self.net, features)


class DiscretizedLogisticMixture(TorchDistribution):
    """8-bit pixels, each a mixture of K logistics discretized to 256 bins (PixelCNN++, Salimans et al. 2017):
    images (..., C, H, W) with values k / 255.

    From the decoder's parameters (..., P, H, W), P = K (1 + 2 C + C (C - 1) / 2): per pixel the mixture's logits,
    then each component's C means and C log scales, then the coefficients by which channel c's mean moves with
    the channels before it (R, then G given R, then B given R and G, as PixelCNN++'s). Pixels are rescaled to
    [-1, 1], where bin k is 2 / 255 wide about 2 k / 255 - 1; the end bins take the tails, so the 256 bins of
    each channel sum to 1.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.unit_interval, 3)

    def __init__(self, params: torch.Tensor, channels: int, components: int, validate_args=None):
        self.params, self.channels, self.components = params, channels, components
        k, c = components, channels
        self.logits = params[..., :k, :, :]  # (..., K, H, W)
        self.locs = params[..., k:k + k * c, :, :].unflatten(-3, (k, c))  # (..., K, C, H, W)
        self.log_scales = params[..., k + k * c:k + 2 * k * c, :, :].unflatten(-3, (k, c)).clamp(min=-7.0)
        self.coeffs = torch.tanh(params[..., k + 2 * k * c:, :, :].unflatten(-3, (k, -1)))  # (..., K, C(C-1)/2, H, W)
        super().__init__(params.shape[:-3], torch.Size((c, *params.shape[-2:])), validate_args=validate_args)

    @staticmethod
    def parameters_per_pixel(channels: int, components: int) -> int:
        return components * (1 + 2 * channels + channels * (channels - 1) // 2)

    def expand(self, batch_shape, _instance=None):
        params = self.params.expand(*batch_shape, *self.params.shape[-3:])
        return DiscretizedLogisticMixture(params, self.channels, self.components, validate_args=False)

    def _means(self, x: torch.Tensor) -> torch.Tensor:
        """Each component's mean of each channel given the channels before it in x (..., 1, C, H, W) in [-1, 1]."""
        means, pair = [], 0
        for c in range(self.channels):
            mean = self.locs[..., c, :, :]
            for before in range(c):
                mean = mean + self.coeffs[..., pair, :, :] * x[..., before, :, :]
                pair += 1
            means.append(mean)
        return torch.stack(torch.broadcast_tensors(*means), dim=-3)  # (..., K, C, H, W)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(x)
        x = (2 * x - 1).unsqueeze(-4)  # (..., 1, C, H, W) in [-1, 1]
        centred = x - self._means(x)
        inverse_scale = torch.exp(-self.log_scales)
        upper = inverse_scale * (centred + 1 / 255)  # the bin's edges, standardized
        lower = inverse_scale * (centred - 1 / 255)
        # log(sigmoid(upper) - sigmoid(lower)), exactly: (e^u - e^l) / ((1 + e^u) (1 + e^l))
        inner = lower + torch.log(torch.expm1(upper - lower)) - F.softplus(upper) - F.softplus(lower)
        first, last = upper - F.softplus(upper), -F.softplus(lower)  # log sigmoid(upper), log (1 - sigmoid(lower))
        per_channel = torch.where(x < -1 + 1 / 255, first, torch.where(x > 1 - 1 / 255, last, inner))
        per_component = per_channel.sum(-3) + torch.log_softmax(self.logits, dim=-3)  # (..., K, H, W)
        return torch.logsumexp(per_component, dim=-3).sum((-2, -1))

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Images drawn pixel by pixel's channels: a component, then each channel's logistic given the ones before,
        clamped to [-1, 1] and rounded to its bin."""
        shape = self._extended_shape(sample_shape)  # (..., C, H, W)
        logits = self.logits.expand(*shape[:-3], *self.logits.shape[-3:])
        chosen = dist.Categorical(logits=logits.movedim(-3, -1)).sample()  # (..., H, W)
        pick = F.one_hot(chosen, self.components).movedim(-1, -3).unsqueeze(-3).to(logits.dtype)  # (..., K, 1, H, W)
        x = torch.zeros(shape, dtype=logits.dtype, device=logits.device).unsqueeze(-4)  # in [-1, 1]
        levels = torch.zeros(shape, dtype=logits.dtype, device=logits.device)  # 0 .. 255
        log_scales = (self.log_scales * pick).sum(-4)
        for c in range(self.channels):
            mean = (self._means(x) * pick).sum(-4)[..., c, :, :]
            u = torch.rand_like(mean).clamp(1e-5, 1 - 1e-5)
            value = mean + log_scales[..., c, :, :].exp() * (torch.log(u) - torch.log1p(-u))
            levels[..., c, :, :] = ((value.clamp(-1, 1) + 1) * 127.5).round()
            x[..., 0, c, :, :] = levels[..., c, :, :] / 127.5 - 1
        return levels / 255


class LogisticMixture(Likelihood):
    """8-bit pixels: a discretized mixture of logistics per pixel (PixelCNN++), the decoder giving its parameters."""

    fits = ("none",)
    settings = ("logistic_components",)

    def __init__(self, channels: int, components: int):
        super().__init__()
        self.channels, self.components = channels, components

    @classmethod
    def from_config(cls, config) -> LogisticMixture:
        return cls(config.shape()[0], config.logistic_components)

    @classmethod
    def decoder_channels(cls, config) -> int:
        return DiscretizedLogisticMixture.parameters_per_pixel(config.shape()[0], config.logistic_components)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return DiscretizedLogisticMixture(params, self.channels, self.components)


def mean_or_draw(d: dist.Distribution) -> torch.Tensor:
    """The mean of p(x | z) where it has one in closed form, else one draw (the autoregressive likelihood's)."""
    try:
        return d.mean
    except NotImplementedError:
        return d.sample()


# --likelihood NAME chooses LIKELIHOODS[NAME]
LIKELIHOODS = {"bernoulli": Bernoulli, "continuous-bernoulli": ContinuousBernoulli, "normal": Normal,
               "pixelcnn": PixelCNNBernoulli, "logistic-mixture": LogisticMixture}


def make_likelihood(config) -> Likelihood:
    """The likelihood that config names."""
    return LIKELIHOODS[config.likelihood].from_config(config)
