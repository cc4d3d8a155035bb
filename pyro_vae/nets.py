"""Encoder and decoder networks: plain nn.Modules, no Pyro in here.

Every network accepts any number of leading batch dimensions, so Pyro can vectorize over
particles (`(S, B, ...)`) as well as over images (`(B, ...)`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from .data import IMAGE_SHAPE, NUM_CLASSES

MIN_SCALE = 1e-4  # floor of every Gaussian scale a network outputs: keeps the log-densities finite


def _loc_scale(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian's loc and scale from a layer's output (..., 2 * D): the halves, the second softplus-ed and floored."""
    loc, raw_scale = out.chunk(2, dim=-1)
    return loc, F.softplus(raw_scale) + MIN_SCALE


def _cat(h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Append a conditioning vector (a one-hot label) to features h, broadcasting their batch dims.

    Under enumeration of the label, c is (10, 1, 10) while h is (B, F): the result is (10, B, F + 10).
    """
    if c is None:
        return h
    batch = torch.broadcast_shapes(h.shape[:-1], c.shape[:-1])
    return torch.cat([h.expand(*batch, h.shape[-1]), c.expand(*batch, c.shape[-1])], dim=-1)


class Encoder(nn.Module):
    """x (..., C, H, W) -> loc, scale (..., latent_dim) of a diagonal Gaussian.

    A conditioning vector c (the CVAE's one-hot label) joins at the head, or, with `cond_at_input`,
    at the first layer: a learned vector per class added to that layer's pre-activations (for an MLP
    exactly the first layer applied to [x, c]). There the label shapes every feature, as in Kingma
    et al.'s M2; under enumeration the first layer still runs once per image, not once per label.
    """

    def __init__(self, features: nn.Module, feature_dim: int, latent_dim: int, cond_dim: int = 0,
                 cond_at_input: bool = False):
        super().__init__()
        self.features = features
        self.cond_input = None
        if cond_dim and cond_at_input:
            first = next(m for m in features if isinstance(m, (nn.Linear, nn.Conv2d)))
            self.first_layers = list(features).index(first) + 1  # features[:first_layers] is pre-activation
            width = first.out_features if isinstance(first, nn.Linear) else first.out_channels
            self.cond_input = nn.Linear(cond_dim, width, bias=False)
        head_in = feature_dim + (cond_dim if self.cond_input is None else 0)
        self.head = nn.Linear(head_in, 2 * latent_dim)

    def _features(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        batch = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        if self.cond_input is None:
            return self.features(x).reshape(*batch, -1)  # (..., feature_dim)
        if c is None:
            raise ValueError("this encoder is conditioned on the label at its input: give the one-hot label c")
        h = self.features[:self.first_layers](x)  # (N, C, ...): the first layer's pre-activations
        item = h.shape[1:]
        bias = self.cond_input(c).reshape(*c.shape[:-1], item[0], *[1] * (len(item) - 1))
        h = h.reshape(*batch, *item) + bias  # broadcasts images against (enumerated) labels
        batch = h.shape[:-len(item)]
        return self.features[self.first_layers:](h.reshape(-1, *item)).reshape(*batch, -1)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._features(x, c)
        if self.cond_input is None:
            h = _cat(h, c)
        return _loc_scale(self.head(h))


class Decoder(nn.Module):
    """z (..., latent_dim) -> per-pixel parameters (..., P, H, W): Bernoulli logits (P = the image's channels), a
    mixture's parameters, or the feature map an autoregressive likelihood conditions on (P = its channels)."""

    def __init__(self, body: nn.Module, latent_dim: int, cond_dim: int = 0, out_channels: int = 1,
                 image_shape: tuple = IMAGE_SHAPE):
        super().__init__()
        self.latent_dim, self.cond_dim = latent_dim, cond_dim
        self.out_shape = (out_channels, *image_shape[1:])
        self.body = body

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = _cat(z, c)
        return self.body(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], *self.out_shape)


class Crop(nn.Module):
    """The top-left (H, W) of a feature map: the decoder's upsampling gives a multiple of 4, cut to the image."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :self.height, :self.width]


def conv_nets(latent_dim: int, channels=(32, 64), cond_dim: int = 0, cond_at_input: bool = False,
              out_channels: int = 1, image_shape: tuple = IMAGE_SHAPE) -> tuple[Encoder, Decoder]:
    """The conv VAE of the TensorFlow and Keras tutorials: Conv 32, 64 (stride 2); ConvTranspose 64, 32, 1
    (out_channels in place of the 1 for a likelihood with more parameters per pixel). Sized from image_shape
    (C, H, W): for MNIST's (1, 28, 28) the maps are 14 and 7 pixels wide."""
    c1, c2 = channels
    image_channels, height, width = image_shape
    h, w = -(-height // 4), -(-width // 4)  # each stride-2 layer halves a side, rounding up: 28 -> 14 -> 7
    features = nn.Sequential(
        nn.Conv2d(image_channels, c1, 3, stride=2, padding=1), nn.ReLU(),  # (B, c1, H / 2, W / 2)
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),  # (B, c2, h, w)
        nn.Flatten(),
    )
    body = nn.Sequential(
        nn.Linear(latent_dim + cond_dim, c1 * h * w), nn.ReLU(),
        nn.Unflatten(1, (c1, h, w)),
        nn.ConvTranspose2d(c1, c2, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # (B, c2, 2h, 2w)
        nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # (B, c1, 4h, 4w)
        nn.ConvTranspose2d(c1, out_channels, 3, stride=1, padding=1),  # (B, out_channels, 4h, 4w)
    )
    if (4 * h, 4 * w) != (height, width):
        body.append(Crop(height, width))  # no parameters: the networks of a side divisible by 4 are unchanged
    return (Encoder(features, c2 * h * w, latent_dim, cond_dim, cond_at_input),
            Decoder(body, latent_dim, cond_dim, out_channels, image_shape))


def mlp_nets(latent_dim: int, hidden_dim: int = 400, cond_dim: int = 0, cond_at_input: bool = False,
             out_channels: int = 1, image_shape: tuple = IMAGE_SHAPE) -> tuple[Encoder, Decoder]:
    """The fully connected VAE of Pyro's tutorial: 784-hidden-z and back (C x H x W pixels in place of 784)."""
    pixels = math.prod(image_shape)
    features = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden_dim), nn.Softplus())
    body = nn.Sequential(nn.Linear(latent_dim + cond_dim, hidden_dim), nn.Softplus(),
                         nn.Linear(hidden_dim, out_channels * pixels // image_shape[0]))
    return (Encoder(features, hidden_dim, latent_dim, cond_dim, cond_at_input),
            Decoder(body, latent_dim, cond_dim, out_channels, image_shape))


class Classifier(nn.Module):
    """x (..., C, H, W) -> logits (..., num_classes) of q(y | x), for the semi-supervised model."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.reshape(-1, *x.shape[-3:])).reshape(*x.shape[:-3], -1)
        return self.head(h)


def make_classifier(config, num_classes: int = NUM_CLASSES) -> Classifier:
    """A network that predicts the digit: the encoder's feature layers (of --classifier-arch, else --arch), a head."""
    arch = config.classifier_arch or config.arch
    encoder, _ = make_nets(dataclasses.replace(config, arch=arch))
    return Classifier(encoder.features, encoder.head.in_features, num_classes)


def glorot_(module: nn.Module) -> nn.Module:
    """Keras's default initialisation, in place: Glorot-uniform weights, zero biases, in each linear and conv layer."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


def make_nets(config, cond_dim: int = 0, out_channels: int = 1) -> tuple[Encoder, Decoder]:
    """Encoder and decoder for config.arch, initialised as config.init says; the decoder gives out_channels maps."""
    at_input, shape = config.label_at == "input", config.shape()
    if config.arch == "mlp":
        nets = mlp_nets(config.latent_dim, config.hidden_dim, cond_dim, at_input, out_channels, shape)
    else:
        nets = conv_nets(config.latent_dim, tuple(config.conv_channels), cond_dim, at_input, out_channels, shape)
    if config.init == "glorot":
        nets = tuple(glorot_(net) for net in nets)
    return nets


class GaussianLayer(nn.Module):
    """A small network for one conditional of a hierarchy: h (..., in_dim) -> loc, scale (..., out_dim).

    Used for the generative p(z_l | z_{l+1}), the bottom-up guide's q(z_{l+1} | z_l), and the
    ladder guide's deterministic rungs (there h is the rung below's (loc, log scale)).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * out_dim))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _loc_scale(self.body(h))


def ladder_pass(encoder: Encoder, rungs: nn.ModuleList, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ladder's deterministic bottom-up pass: (loc, scale) for z_1 (the encoder's) up to z_L (the rungs').

    Each rung reads the (loc, log scale) of the rung below, so the pass is deterministic in x.
    """
    params = [encoder(x)]
    for rung in rungs:
        loc, scale = params[-1]
        params.append(rung(torch.cat([loc, scale.log()], dim=-1)))
    return params


def make_hierarchy_nets(config) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The nets between stochastic layers: top-down p(z_l | z_{l+1}) and the guide's bottom-up ones, l = 1 .. L-1.

    Bottom-up: q(z_{l+1} | z_l) for --guide normal/iaf, or the ladder's rungs from (loc, log scale) of z_l.
    With one layer both lists are empty (and add no parameters).
    """
    dims, hidden = config.layer_dims(), config.layer_hidden_dim
    top_down = nn.ModuleList(GaussianLayer(dims[l + 1], hidden, dims[l]) for l in range(len(dims) - 1))
    up_in = 2 if config.guide == "ladder" else 1
    bottom_up = nn.ModuleList(GaussianLayer(up_in * dims[l], hidden, dims[l + 1]) for l in range(len(dims) - 1))
    if config.init == "glorot":
        top_down, bottom_up = glorot_(top_down), glorot_(bottom_up)
    return top_down, bottom_up


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the pixels before its centre in raster order (PixelCNN, van den Oord et al. 2016):
    the rows above, and the pixels to the left in its own row; with `include_centre` also the centre itself."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, include_centre: bool):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        mask = torch.zeros(kernel, kernel)
        mask[:kernel // 2] = 1  # the rows above the centre
        mask[kernel // 2, :kernel // 2 + include_centre] = 1  # the centre row up to (or up to and with) the centre
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(nn.Module):
    """Logits of each pixel given the pixels before it and a feature map of z: (N, I, H, W), (N, C, H, W) ->
    (N, I, H, W), for images of I channels (MNIST: 1); the channels of one pixel are independent given the pixels
    before it and z.

    A masked convolution that leaves out the centre reads x, then `layers` residual masked convolutions that
    include it; the feature map enters every layer through a 1x1 convolution. Pixel (i, j) sees the pixels of x
    up to `receptive_radius` rows above and columns either side of it, before it in raster order, and nothing else:
    a small window leaves the image's global shape to z (Chen et al. 2017, the Variational Lossy Autoencoder).
    With `gated`, each residual layer is van den Oord et al. (2016)'s gate: its masked convolution (and the feature
    map's term) has twice the channels, a and b, and adds tanh(a) * sigmoid(b) in place of relu(.); the window is
    the same.
    """

    def __init__(self, channels: int, layers: int, kernel: int, gated: bool = False, image_channels: int = 1):
        super().__init__()
        width = 2 * channels if gated else channels  # a residual layer's output: (a, b) gated, else one map
        self.first = MaskedConv2d(image_channels, channels, kernel, include_centre=False)
        self.layers = nn.ModuleList(MaskedConv2d(channels, width, kernel, include_centre=True)
                                    for _ in range(layers))
        self.condition = nn.Conv2d(channels, channels + width * layers, 1)  # the feature map's term in every layer
        self.out = nn.Conv2d(channels, image_channels, 1)
        self.receptive_radius = (layers + 1) * (kernel // 2)
        self.split = [channels] + [width] * layers
        self.gated = gated

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """What a residual layer adds to h from its pre-activation (masked convolution + the feature map's term)."""
        if not self.gated:
            return F.relu(pre)
        a, b = pre.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        terms = self.condition(features).split(self.split, dim=1)
        h = F.relu(self.first(x) + terms[0])
        for layer, term in zip(self.layers, terms[1:]):
            h = h + self.activation(layer(h) + term)
        return self.out(h)

    def logit_at(self, x: torch.Tensor, condition: torch.Tensor, row: int, col: int) -> torch.Tensor:
        """The logit of pixel (row, col), (N,) (of an image of I > 1 channels (N, I)): self(x, features)[:, :, row,
        col], from condition =
        self.condition(features) (pointwise: the pixel loop computes it once per image), each layer computed only
        where the layers after it read it (the last at the pixel alone, each one before it a kernel's reach wider).
        What it reads of x lies in the receptive window: rows up to `receptive_radius` above, as many columns
        either side. The pixel loop of AutoregressiveBernoulli calls it once per pixel."""
        step, width = self.first.padding[0], x.shape[-1]

        def box(reach: int) -> tuple[int, int, int]:  # top, left, right of the rows above (row, col) and its own
            return max(0, row - reach), max(0, col - reach), min(width, col + reach + 1)

        def part(t: torch.Tensor, reach: int) -> torch.Tensor:  # of a whole map
            top, left, right = box(reach)
            return t[..., top:row + 1, left:right]

        def narrow(t: torch.Tensor, reach: int) -> torch.Tensor:  # t spans box(reach + step): its part in box(reach)
            (top, left, _), (inner_top, inner_left, inner_right) = box(reach + step), box(reach)
            return t[..., inner_top - top:, inner_left - left:inner_right - left]

        terms = condition.split(self.split, dim=1)
        reach = len(self.layers) * step
        h = F.relu(narrow(self.first(part(x, reach + step)), reach) + part(terms[0], reach))
        for layer, term in zip(self.layers, terms[1:]):
            reach -= step
            h = narrow(h, reach) + self.activation(narrow(layer(h), reach) + part(term, reach))
        logits = self.out(h)[:, :, 0, 0]  # (N, I)
        return logits[:, 0] if logits.shape[1] == 1 else logits
