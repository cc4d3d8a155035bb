"""Deterministic coding networks (Ballé, Johnston & Minnen, ICLR 2019): the trained networks recomputed on integers.

A file decodes only if the decoder computes every probability the encoder coded with bit for bit. Floating-point
convolutions do not promise that: oneDNN and ATen pick other kernels on other CPUs (AVX2, SSE4.1, AVX-512), and each
rounds its sums its own way. So while coding, each network the coded probabilities depend on (the encoder's
q(z | x), the decoder's pixel logits, each hierarchy layer's p(z_l | z_l+1) and q(z_l+1 | z_l)) is replaced by a
fixed-point copy:

- each layer's fp32 weights become integers, w * 2^s rounded, with s chosen per layer so that |w * 2^s| <= 2^15;
  its bias is rounded onto the scale of the layer's sums;
- activations are integers too: hidden ones multiples of 2^-ACT_BITS, clamped to |a| <= 2^ACT_RANGE_BITS; the last
  layer's outputs (loc, raw scale, logits) multiples of 2^-OUT_BITS;
- a layer's sums are computed by torch in float64 on these integers. Every product is an integer below 2^53 and so
  is every partial sum, in whatever order a kernel adds the terms: the sum of |w_int| * max |a_int| + |b_int| over a
  layer's inputs bounds them all, and `_Affine` checks that bound against 2^53 when it is built (for conv32:
  3,136 inputs x 2^15 x 2^23 < 2^50). Integer sums below 2^53 are exact in float64, so the result is the same
  on every CPU, kernel and thread count;
- ReLU and clamping are exact; softplus, the sigmoid, exp and log are read from integer tables (`_table`) built once
  with Python's decimal module (software arithmetic, correctly rounded: the same integers everywhere) and
  interpolated linearly with integer arithmetic.

What the coder then sees is a deterministic function of integers: the Gaussians' loc and scale (dyadic numbers in
float64), the pixels' probabilities (integers / 2^32) and, with K importance samples, the log weights (integers,
2^-16 nats) that pick the draw. Training is untouched: the copies exist only inside `exact_networks`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from decimal import Context, Decimal
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from ..nets import MIN_SCALE, Decoder, Encoder, GaussianLayer

ACT_BITS = 12  # hidden activations (and the latent values fed to a network): multiples of 2^-12
ACT_RANGE_BITS = 11  # hidden activations are clamped to |a| <= 2^11 (trained ReLU features stay far below)
OUT_BITS = 16  # a network's outputs (loc, the scale before its softplus, pixel logits): multiples of 2^-16
WEIGHT_BITS = 15  # each layer's weights are scaled to integers of at most 2^15 in magnitude
EXACT = 2 ** 53  # integers below this are exact in float64, and so is any sum of them that stays below it
TABLE_RANGE = 32  # the softplus and sigmoid tables span [-32, 32]; beyond it softplus(t) = t or 0, sigmoid 1 or 0
TABLE_STEP_BITS = 6  # a table point every 2^-6, linear between (softplus: off by < 2^-17, below OUT_BITS)
PROB_BITS = 32  # pixel probabilities are integers / 2^32
LOG_BITS = 16  # log probabilities (the importance weights' terms) are integers / 2^16 nats
CHUNK = 32  # rows per pass through a network (see _Stack.forward)
MIN_SCALE_INT = round(MIN_SCALE * 2 ** OUT_BITS)  # the scales' floor on the output grid (7 / 2^16 ~ MIN_SCALE)


class NotExact(Exception):
    """A network the fixed-point copy does not cover (it stays in floating point: its files are not portable)."""


def _decimal(f, points) -> list[int]:
    """round(f(p)) for each p (Decimal arithmetic at 40 digits: correctly rounded, identical on every machine)."""
    context = Context(prec=40)
    return [int(f(Decimal(p), context).to_integral_value()) for p in points]


@lru_cache(maxsize=None)
def _table(name: str) -> torch.Tensor:
    """An integer table (int64) of one function, built with exact decimal arithmetic from integer points."""
    step = 1 << TABLE_STEP_BITS
    grid = [Decimal(i) / step - TABLE_RANGE for i in range(2 * TABLE_RANGE * step + 2)]
    scale = Decimal(2) ** PROB_BITS
    if name == "softplus":  # 2^32 log(1 + e^t)
        values = _decimal(lambda t, c: c.multiply(c.ln(c.add(1, c.exp(t))), scale), grid)
    elif name == "sigmoid":  # 2^32 / (1 + e^-t)
        values = _decimal(lambda t, c: c.divide(scale, c.add(1, c.exp(-t))), grid)
    elif name == "log_mantissa":  # 2^32 ln(1 + i / 2^10), i = 0 .. 2^10
        values = _decimal(lambda i, c: c.multiply(c.ln(c.add(1, c.divide(i, 1024))), scale), range(1026))
    elif name == "exp_coarse":  # 2^30 e^(-i / 2^6), i = 0 .. 40 nats
        values = _decimal(lambda i, c: c.multiply(c.exp(-c.divide(i, 64)), 1 << 30), range(40 * 64 + 1))
    elif name == "exp_fine":  # 2^30 e^(-i / 2^16), i = 0 .. 2^10
        values = _decimal(lambda i, c: c.multiply(c.exp(-c.divide(i, 1 << 16)), 1 << 30), range(1 << 10))
    else:
        raise KeyError(name)
    return torch.tensor(values, dtype=torch.int64)


@lru_cache(maxsize=None)
def _ln2(bits: int) -> int:
    return int(Context(prec=40).multiply(Decimal(2).ln(Context(prec=40)), Decimal(2) ** bits).to_integral_value())


def _interpolate(name: str, v: torch.Tensor, bits: int) -> torch.Tensor:
    """The table `name` at v / 2^bits (int64, clamped to the table's span), on its 2^32 scale."""
    span, shift = TABLE_RANGE << bits, bits - TABLE_STEP_BITS
    t = v.clamp(-span, span) + span
    index, rest = t >> shift, t & ((1 << shift) - 1)
    table = _table(name).to(v.device)
    low = table[index]
    return low + (((table[index + 1] - low) * rest) >> shift)


def softplus(v: torch.Tensor, bits: int) -> torch.Tensor:
    """softplus(v / 2^bits) * 2^bits, rounded down: int64 in, int64 out."""
    out = _interpolate("softplus", v, bits) >> (PROB_BITS - bits)
    return torch.where(v > TABLE_RANGE << bits, v, out)


def sigmoid(v: torch.Tensor, bits: int) -> torch.Tensor:
    """sigmoid(v / 2^bits) * 2^32, kept inside 1 .. 2^32 - 1: int64."""
    return _interpolate("sigmoid", v, bits).clamp(1, (1 << PROB_BITS) - 1)


def log_bernoulli(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | logits) of binary pixels, summed over the last three dimensions, in units of 2^-LOG_BITS nats
    (int64): -softplus(-(2x - 1) l). logits: float64 multiples of 2^-OUT_BITS."""
    v = to_int(logits, OUT_BITS) * (1 - 2 * x.to(torch.int64))
    return -(softplus(v, OUT_BITS) >> (OUT_BITS - LOG_BITS)).sum((-3, -2, -1))


def ln(n: np.ndarray) -> np.ndarray:
    """ln(n) * 2^LOG_BITS, rounded down, of integers 1 <= n < 2^30 (int64 numpy): exponent and an interpolated
    mantissa table, integers only."""
    n = np.asarray(n, dtype=np.int64)
    exponent = np.frexp(n.astype(np.float64))[1].astype(np.int64) - 1  # exact: n < 2^53
    mantissa = (n << (30 - exponent)) - (1 << 30)  # (n / 2^e - 1) * 2^30, in 0 .. 2^30
    index, rest = mantissa >> 20, mantissa & ((1 << 20) - 1)
    table = _table("log_mantissa").numpy()
    low = table[index]
    value = low + (((table[index + 1] - low) * rest) >> 20) + exponent * _ln2(PROB_BITS)
    return value >> (PROB_BITS - LOG_BITS)


def softmax(log_w: np.ndarray) -> np.ndarray:
    """exp(log_w) normalized over the last axis, from integer log weights (2^-LOG_BITS nats): float64 rows whose
    every entry is an integer over the row's integer total (one correctly rounded division)."""
    d = np.minimum(log_w.max(axis=-1, keepdims=True) - log_w, (40 << LOG_BITS) - 1)  # >= 0
    coarse, fine = _table("exp_coarse").numpy(), _table("exp_fine").numpy()
    w = (coarse[d >> 10] * fine[d & 1023]) >> 30  # 2^30 e^-d: the largest weight is 2^30
    return np.ascontiguousarray(w / w.sum(axis=-1, keepdims=True))


def to_int(v: torch.Tensor, bits: int) -> torch.Tensor:
    """v (float64 multiples of 2^-bits) as int64 integers."""
    return (v.double() * 2.0 ** bits).round().to(torch.int64)


class _Affine(nn.Module):
    """A Linear, Conv2d or ConvTranspose2d layer on integers held in float64: input multiples of 2^-in_bits with
    |a| <= limit (as integers), sums multiples of 2^-(in_bits + s), exact (see the module's docstring)."""

    def __init__(self, layer: nn.Module, in_bits: int, limit: float, extra: torch.Tensor | None = None):
        super().__init__()
        w, b = layer.weight.detach().cpu().double(), layer.bias
        top = float(w.abs().max())
        self.shift = WEIGHT_BITS - (math.frexp(top)[1] if top > 0 else 0)  # |w| < 2^e: |w * 2^shift| <= 2^15
        self.bits = in_bits + self.shift  # the sums' scale
        self.register_buffer("weight", torch.round(w * 2.0 ** self.shift))  # buffers: .to(device) moves them
        self.channel_first = isinstance(layer, nn.ConvTranspose2d)  # its maps are (C, N, H, W)
        self.register_buffer("bias", None if b is None else torch.round(b.detach().cpu().double() * 2.0 ** self.bits))
        # convolutions as matrix products (float64 GEMM; torch's float64 convolutions are several times slower)
        # over unfolded patches, and a transposed one's products added where they land (_transposed)
        if isinstance(layer, nn.Linear):
            self.op, per_output = (lambda a: a @ self.weight.T), self.weight.abs().sum(1)
        elif isinstance(layer, nn.ConvTranspose2d):
            self.op, per_output = self._transposed(layer), self.weight.abs().sum((0, 2, 3))  # each output: at most
            #                                                                                 these terms
        elif type(layer) is nn.Conv2d:
            self.op, per_output = self._conv(layer), self.weight.abs().sum((1, 2, 3))
        else:
            raise NotExact(f"no fixed-point copy of {type(layer).__name__}")
        if layer.weight.dtype != torch.float32 or getattr(layer, "groups", 1) != 1 or \
                getattr(layer, "dilation", (1, 1)) not in ((1, 1), 1):
            raise NotExact(f"no fixed-point copy of this {type(layer).__name__}")
        bound = per_output * limit + (0 if self.bias is None else self.bias.abs())
        if extra is not None:
            bound = bound + extra
        if float(bound.max()) >= EXACT / 4:  # a margin for the rounding's + 1/2 (see _rescale)
            raise NotExact(f"a {type(layer).__name__}'s sums could reach 2^{math.log2(float(bound.max())):.1f}, "
                           "past float64's exact integers")

    def _conv(self, layer: nn.Conv2d):
        kernel, stride, padding = layer.kernel_size, layer.stride, layer.padding
        def op(a: torch.Tensor) -> torch.Tensor:
            matrix = self.weight.reshape(len(self.weight), -1)  # (out, in * kh * kw)
            h, w = ((size + 2 * p - k) // s + 1 for size, p, k, s in zip(a.shape[-2:], padding, kernel, stride))
            patches = nn.functional.unfold(a, kernel, padding=padding, stride=stride)  # (N, in * kh * kw, h * w)
            return _batched(matrix, patches).reshape(len(a), len(matrix), h, w)
        return op

    def _transposed(self, layer: nn.ConvTranspose2d):
        """The op on channel-first maps (C, N, H, W): one GEMM gives every tap's products (out, kh, kw, N, H, W),
        and kh x kw strided adds put each tap's where it lands (torch's col2im is a slow loop; the GEMM's own
        layout also spares the transposes of a batch-first one). The adds sum integers: exact in any order."""
        kernel, stride, padding, extra = layer.kernel_size, layer.stride, layer.padding, layer.output_padding
        def op(a: torch.Tensor) -> torch.Tensor:
            matrix = self.weight.reshape(self.weight.shape[0], -1).T  # (out * kh * kw, in)
            channels, n, h, w = a.shape
            taps = (matrix @ a.reshape(channels, -1)).reshape(-1, *kernel, n, h, w)
            size = [(m - 1) * s - 2 * p + k + e for m, s, p, k, e in zip((h, w), stride, padding, kernel, extra)]
            full = [max((m - 1) * s + k, p + o) for m, s, k, p, o in zip((h, w), stride, kernel, padding, size)]
            out = taps.new_zeros(len(taps), n, *full)
            (sh, sw), (kh, kw) = stride, kernel
            for i in range(kh):
                for j in range(kw):
                    out[:, :, i:i + (h - 1) * sh + 1:sh, j:j + (w - 1) * sw + 1:sw] += taps[:, i, j]
            return out[:, :, padding[0]:padding[0] + size[0], padding[1]:padding[1] + size[1]]
        return op

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """a: (N, features) or (N, C, H, W); a transposed convolution's (C, N, H, W), its output too."""
        out = self.op(a)
        if self.bias is not None:  # along the channels: dim 0 of channel-first maps, else dim 1 (or a row's last)
            shape = [1] * out.dim()
            shape[0 if self.channel_first else 1] = -1
            out += self.bias.view(shape)
        return out


def _batched(matrix: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """matrix @ a[n] for each n of a (N, I, L): as one GEMM over (I, N * L), faster than N small ones."""
    n, inner, length = a.shape
    out = matrix @ a.transpose(0, 1).reshape(inner, n * length)
    return out.reshape(len(matrix), n, length).transpose(0, 1)


def _rescale(v: torch.Tensor, bits: int, to_bits: int, limit: float | None, relu: bool = False) -> torch.Tensor:
    """Integers at 2^-bits onto 2^-to_bits, rounded to the nearest (halves up), clamped (to 0 .. limit: relu),
    in place. Exact: a power-of-two product, + 1/2 (|v| < 2^51 leaves float64 room for it) and a floor."""
    v = v.mul_(2.0 ** (to_bits - bits)).add_(0.5).floor_()
    if limit is None:
        return v.clamp_(min=0) if relu else v
    return v.clamp_(0 if relu else -limit, limit)


class _Stack(nn.Module):
    """A Sequential of layers, ReLU, Softplus, Flatten and Unflatten in fixed point: hidden activations at
    ACT_BITS, clamped; the last layer's outputs (final) at OUT_BITS, unclamped (_Affine bounds them below 2^53)."""

    def __init__(self, layers, in_bits: int, limit: float, final: bool = True):
        super().__init__()
        layers, self.steps = list(layers), []
        last = max(i for i, m in enumerate(layers) if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)))
        last = last if final else -1  # the stack's outputs: at OUT_BITS (final) or hidden activations
        hidden = float(1 << (ACT_BITS + ACT_RANGE_BITS))
        for i, module in enumerate(layers):
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                affine = _Affine(module, in_bits, limit)
                to_bits = OUT_BITS if i == last else ACT_BITS
                self.steps.append((affine, affine.bits, to_bits, None if i == last else hidden))
                in_bits, limit = to_bits, hidden
            elif isinstance(module, (nn.ReLU, nn.Softplus, nn.Flatten, nn.Unflatten)):
                if isinstance(module, nn.Softplus) and (module.beta != 1 or module.threshold != 20):
                    raise NotExact("no fixed-point copy of a Softplus with other beta or threshold")
                self.steps.append((module, None, None, None))
            else:
                raise NotExact(f"no fixed-point copy of {type(module).__name__}")
        self.out_bits = OUT_BITS
        self.layers = nn.ModuleList(step[0] for step in self.steps)  # registered: .to(device) moves their weights

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Rows in chunks of CHUNK (each row's integers do not depend on the others: the same result, but a chunk's
        maps stay in the cache: 2-3x faster than one pass over K x 100 rows on this CPU)."""
        return a if len(a) == 0 else torch.cat([self._chunk(c) for c in a.split(CHUNK)])

    def _chunk(self, a: torch.Tensor) -> torch.Tensor:
        relu_done, channel_first = False, False  # a transposed convolution's maps are (C, N, H, W) until the next
        for i, (module, bits, to_bits, limit) in enumerate(self.steps):  # layer that is not one
            wants = channel_first if isinstance(module, nn.ReLU) else getattr(module, "channel_first", False)
            if wants != channel_first:
                a, channel_first = a.transpose(0, 1), wants
                a = a if wants else a.contiguous()
            if bits is not None:
                relu_done = i + 1 < len(self.steps) and isinstance(self.steps[i + 1][0], nn.ReLU)
                a = _rescale(module(a), bits, to_bits, limit, relu_done)
            elif isinstance(module, nn.ReLU):
                a = a if relu_done else a.clamp(min=0)
            elif isinstance(module, nn.Softplus):
                a = softplus(a.to(torch.int64), ACT_BITS).double()
            else:
                a = module(a)
        return a.transpose(0, 1).contiguous() if channel_first else a


def _latent(z: torch.Tensor) -> torch.Tensor:
    """A network's latent input on the activation grid: z * 2^ACT_BITS rounded, clamped (float64 integers)."""
    limit = float(1 << (ACT_BITS + ACT_RANGE_BITS))
    return torch.round(z.double() * 2.0 ** ACT_BITS).clamp(-limit, limit)


def _one_hot(c: torch.Tensor) -> torch.Tensor:
    return c.double() * 2.0 ** ACT_BITS  # a one-hot label: 0 and 1 exactly


def _loc_scale(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian's loc and scale (float64, multiples of 2^-OUT_BITS) from integer outputs at OUT_BITS."""
    loc, raw = out.chunk(2, dim=-1)
    scale = softplus(raw.to(torch.int64), OUT_BITS) + MIN_SCALE_INT
    return loc * 2.0 ** -OUT_BITS, scale.double() * 2.0 ** -OUT_BITS


def _cat(h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    if c is None:
        return h
    batch = torch.broadcast_shapes(h.shape[:-1], c.shape[:-1])
    c = _one_hot(c)
    return torch.cat([h.expand(*batch, h.shape[-1]), c.expand(*batch, c.shape[-1])], dim=-1)


class ExactEncoder(nn.Module):
    """x (..., 1, 28, 28) -> loc, scale of q(z | x): Encoder in fixed point (the label, if any, at the head)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        if encoder.cond_input is not None:
            raise NotExact("--label-at input")
        self.features = _Stack(encoder.features, 0, 1.0, final=False)  # binary pixels: integers 0 and 1
        limit = float(1 << (ACT_BITS + ACT_RANGE_BITS))
        self.head = _Stack([encoder.head], ACT_BITS, limit)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, device = x.shape[:-3], _device(self)
        h = self.features(x.reshape(-1, *x.shape[-3:]).to(device, torch.float64)).reshape(*batch, -1)
        return tuple(t.cpu() for t in _loc_scale(self.head(_cat(h, None if c is None else c.to(device)))))


class ExactDecoder(nn.Module):
    """z (..., D) -> pixel logits (..., 1, 28, 28), float64 multiples of 2^-OUT_BITS: Decoder in fixed point."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        if decoder.out_shape[0] != 1:
            raise NotExact("a decoder that feeds an autoregressive likelihood")
        self.out_shape = decoder.out_shape
        self.body = _Stack(decoder.body, ACT_BITS, float(1 << (ACT_BITS + ACT_RANGE_BITS)))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        device = _device(self)
        h = _cat(_latent(z.to(device)), None if c is None else c.to(device))
        out = self.body(h.reshape(-1, h.shape[-1]))
        return (out * 2.0 ** -OUT_BITS).reshape(*h.shape[:-1], *self.out_shape).cpu()


class ExactGaussianLayer(nn.Module):
    """h (..., in) -> loc, scale: a hierarchy's GaussianLayer in fixed point."""

    def __init__(self, layer: GaussianLayer):
        super().__init__()
        self.body = _Stack(layer.body, ACT_BITS, float(1 << (ACT_BITS + ACT_RANGE_BITS)))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = h.shape[:-1]
        out = self.body(_latent(h.to(_device(self))).reshape(-1, h.shape[-1]))
        return tuple(t.cpu() for t in _loc_scale(out.reshape(*batch, -1)))


def _device(module: nn.Module) -> torch.device:
    """Where a copy's integer weights are (the CPU, or a GPU: exact there too; what it returns is on the CPU)."""
    return next(module.buffers()).device


def why_not_exact(vae: nn.Module) -> str | None:
    """Why this run's networks have no fixed-point copy (its files then use float networks); None when they do."""
    try:
        _copies(vae)
    except NotExact as e:
        return str(e)
    return None


def _copies(vae: nn.Module) -> dict:
    """Attribute paths of vae -> their fixed-point copies."""
    if getattr(vae, "ladder", False):
        raise NotExact("the ladder guide")
    if not isinstance(vae.encoder, Encoder) or not isinstance(vae.decoder, Decoder):
        raise NotExact("networks other than the Encoder and Decoder of pyro_vae.nets")
    for piece, flag in ((vae.prior, "--prior"), (vae.posterior, "--guide")):
        if any(isinstance(m, nn.Linear) for m in piece.modules()):
            raise NotExact(f"the networks of {flag} {type(piece).__name__} (a flow's)")
    copies = {("encoder",): ExactEncoder(vae.encoder), ("decoder",): ExactDecoder(vae.decoder)}
    for name in ("top_down", "bottom_up"):
        for i, layer in enumerate(getattr(vae, name)):
            if not isinstance(layer, GaussianLayer):
                raise NotExact(f"a {name} network other than GaussianLayer")
            copies[(name, i)] = ExactGaussianLayer(layer)
    return copies


@contextmanager
def exact_networks(vae: nn.Module, device: str | torch.device = "cpu"):
    """The run's networks replaced by their fixed-point copies inside the block (their sums computed on device,
    their outputs on the CPU); the trained ones after."""
    copies, originals = _copies(vae), {}
    for path, copy in copies.items():
        originals[path] = _swap(vae, path, copy.to(device))
    try:
        yield
    finally:
        for path, original in originals.items():
            _swap(vae, path, original)


def _swap(vae: nn.Module, path: tuple, module: nn.Module) -> nn.Module:
    if len(path) == 1:
        before = getattr(vae, path[0])
        setattr(vae, path[0], module)
    else:
        holder = getattr(vae, path[0])
        before, holder[path[1]] = holder[path[1]], module
    return before
