"""Lossless compression of binary MNIST by bits-back coding with the trained model and guide.

Bits-back ANS (Townsend, Bird & Barber, ICLR 2019): for each image x, pop z from the stack with q(z | x)
(the bits back), push x with p(x | z), push z with p(z); a file then costs about -ELBO bits per image. Three
extensions, each asked of the run's own distributions:

- K importance samples (`k`; Ruan et al., ICML 2021, BB-IS): pop K draws of z from a proposal r (q(z | x), a
  little wider) and the index j of one of them in proportion to its weight w_k = p(x, z_k) / r(z_k | x), code x and
  z_j, and push the rest back; an image then costs -log (1/K sum_k w_k), the importance-weighted bound. The K draws
  are coupled (one uniform per latent dimension, shifted K ways), so the initial bits stay those of one draw.
- Hierarchies (`--layers L` runs with the bottom-up guide): Bit-Swap's order (Kingma et al., ICML 2019), layer by
  layer, so the bits popped for z_l+1 come from what z_l and x pushed, and the initial bits do not grow with L.
- Label-conditioned runs: the label is pushed last with the model's own p(y), so images and labels come back.
- The flow prior and the IAF guide (one layer): z = g(e) is coded as the flow's base e, whose prior is the
  diagonal N(0, I), with a full-covariance proposal r(e | x) fitted to q(z | x)'s draws carried through g^-1; an image
  then costs -log (1/K sum_k p(e_k) p(x | g(e_k)) / r(e_k | x)), a bound on -log p(x) whatever r.

Each latent dimension is cut into 2^precision bins of equal mass under a normal as wide as the guide's draws of it
on the images coded (the file stores that frame); every Gaussian of the program (q(z_l | .), p(z_l | .), p(z | y))
is discretized onto them as an integer CDF of total 2^24, computed with integer arithmetic so that encoder and
decoder agree on it whatever array it sits in. p(x | z) is evaluated at the bins' centres. constriction's ANS
stack coder does the coding.

Encoder and decoder must compute the same probabilities bit for bit: both run the networks on one thread on the
same batches in reverse order, and a checksum of the images makes a decoder that did not (another CPU, another
torch) fail loudly instead of writing wrong images.

`python -m pyro_vae.compress RUN FILE` and `python -m pyro_vae.compress --decode FILE OUT.npy` are thin
shells over `encode(run, images) -> bytes` and `decode(run, data) -> images`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.runtime import NonlocalExit
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from ..checkpoint import PRETRAINED, CheckpointError, load, run_directory
from ..data import IMAGE_SHAPE, NUM_CLASSES
from ..likelihoods import AutoregressiveBernoulli
from ..trained import TrainedVAE
from . import networks

MAGIC = b"PVAEBB"  # pyro_vae bits-back
VERSION = 3  # 1: the ELBO codec of one layer (2026-11-28); 2: K samples, layers, labels, integer CDFs; 3: the
# coding networks in fixed point (networks.py): a file decodes on any CPU (a byte says so; float for PixelCNN)
READABLE = (2, 3)  # format 2 is read with floating-point networks: it decodes where the kernels match the encoder's
# bits per latent dimension: 2^12 bins of equal mass under the latent's spread, narrow beside q(z | x). Every bin
# keeps at least 2^-24 of each CDF, so q leaks 2^(precision - 24) of its mass into far bins (measured with format 1
# on conv32, 2000 images: the file's excess over -ELBO is 0.2 bits an image at 12, 0.4 at 14, 1.5 at 16)
PRECISION = 12
FINE_BITS = 24  # the integer CDFs' total is 2^24: a uniform of 24 bits picks a bin and a place inside it
# importance samples for a one-layer run (a hierarchy codes at its ELBO, K = 1): the most whose encoding and decoding of
# the 10,000 test images stays within 10 minutes on this project's 2-core CPU, one thread (conv32: 245 + 217 s
# whole commands, 0.1679 bits per pixel against 0.1787 at K = 1; K = 64 would gain 0.0008 more in 15 minutes:
# docs/compression.md)
DEFAULT_K = 32
# with K > 1 the draws come from q(z | x) with its deviations this much wider: an ELBO-trained q is narrower than the
# posterior, and importance weights from a narrow proposal are heavy-tailed (measured on conv32, K = 24, 300 images:
# 1.1 codes 0.59 bits an image below 1.0, 1.2 0.78, 1.3 0.61)
DEFAULT_WIDEN = 1.2
# the base-space proposal of a flow run is fitted to the guide's draws, not the ELBO-trained q itself: it needs less
# (pixelcnn_flow_iaf, first 100 test images, -IWAE_32 of r: 78.14 nats at 1.0, 78.09 at 1.1, 78.12 at 1.2, the guide's
# own 77.92; experiments/base_space_proposal.py)
BASE_SPACE_WIDEN = 1.1
MAX_K = 1024
MAX_BATCH = 100  # images per batch once the stack holds enough bits
LARGEST_BATCH = 10_000  # the most a file may ask for (memory: see _working_bytes)
MARGINAL_IMAGES = 4096  # the images whose posteriors each latent's bins are cut for
SAMPLES_PER_PASS = 500  # images x importance samples per decoder call: bounds the activations' memory
NUM_THREADS = 1  # how torch splits a sum across threads changes its last bits: fixed, so both sides agree
SEED_TAG = b"pyro_vae bits-back initial bits"  # the pseudo-random words that seed the stack come from this
SHIFT_TAG = b"pyro_vae bits-back coupling"  # the K draws' shifts come from this
ASSUMED_BITS_PER_IMAGE = 64  # a floor on -ELBO in bits on MNIST (real models: 115 or more), for the batch ramp
PIXELS = math.prod(IMAGE_SHAPE)
_HEADER_2 = struct.Struct("<6sBBHBBIIII32s32sHHe")
_HEADER = struct.Struct("<6sBBHBBIIII32s32sHHeB")  # magic, version, precision, K, layers, labelled, images, max
#                              batch, seed and data words, weights' and images' SHA-256, lengths of the run's path and
#                              of the marginals (float16 values), the proposal's widening, whether the coding networks
#                              were the fixed-point ones (format 3); then the path, the marginals
_PHI_RANGE = 8  # the normal CDF is 0 below -8 and 1 above 8 at 2^-32
_PHI_STEP_BITS = 10  # the CDF's table has a point every 2^-10, interpolated linearly between them: a bin in
#                     the tails (2^-8 wide at 3 sd) gets the mass of a chord, 0.2% off at most
# the flow prior and the IAF guide: the proposal r(e | x) in the flow's base space is the mean and covariance of this
# many draws of q(z | x) carried through g^-1, from a fixed seed, so encoder and decoder fit the same r
FIT_DRAWS = 1024
FIT_SEED = 0
_T_BITS = 26  # (edge - loc) / scale is rounded to 2^-26 before the table is read (a central bin of N(0, 1) is
#               2^-11 wide: its mass is then right to 0.01%)


class CompressError(Exception):
    """Images that cannot be coded, a file that cannot be decoded, or a model the codec does not support."""


class BadImages(CompressError):
    """Images (or labels) that are not a binary (N, 28, 28) array (or N digits)."""


# What the codec supports: asked of the run's distributions, not of their names


def _diagonal_normal(d) -> bool:
    """Whether d is a diagonal Normal over one vector (independent over the latent dimensions)."""
    return isinstance(d, dist.Independent) and type(d.base_dist) is dist.Normal and d.reinterpreted_batch_ndims == 1


def _over_diagonal_normal(d) -> bool:
    """Whether d is a diagonal Normal pushed through invertible transforms (a flow): coded in its base space."""
    return (isinstance(d, dist.TransformedDistribution) and _diagonal_normal(d.base_dist)
            and all(t.bijective for t in d.transforms))


def _binary_pixels(d) -> bool:
    """Whether d codes binary pixels: each its own Bernoulli given z (coded all at once), or each given the ones
    before it (pixel by pixel)."""
    independent = isinstance(d, dist.Independent) and type(d.base_dist) is dist.Bernoulli
    return independent or isinstance(d, AutoregressiveBernoulli)


def unsupported(run: TrainedVAE, k: int = 1) -> str | None:
    """Why the codec cannot compress with this run (with k importance samples), in one line naming the flag; None
    when it can.

    Asked of the run's model and guide traced on two blank images: every latent site must be a diagonal Gaussian
    in both (its bins are coded one dimension at a time), the guide must go bottom-up, q(z | x) q(z2 | z) ...
    (Bit-Swap's order), and p(x | z) must be Bernoulli pixels, independent given z or each given the ones before.
    One layer may have flows (a diagonal Gaussian through invertible transforms) in the prior and the guide: z is
    then coded in the prior's base space (_Program.proposal).
    """
    vae, config = run.vae, run.config
    if config.shape() != IMAGE_SHAPE or config.data or config.dataset != "mnist":  # docs/own_data.md
        return (f"the codec codes MNIST's binary {' x '.join(map(str, IMAGE_SHAPE))} images, and this run's are "
                f"{config.data or config.dataset}'s {' x '.join(map(str, config.shape()))} (channels, height, width)")
    x = torch.zeros(2, *IMAGE_SHAPE, device=run.device)
    y = torch.zeros(2, dtype=torch.long, device=run.device) if vae.conditional else None
    with torch.no_grad():
        guide = poutine.trace(vae.guide).get_trace(x, y)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, y)
    latents = [name for name, site in guide.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]
    if latents != list(vae.sites):
        return (f"--guide {config.guide}: Bit-Swap pops each layer given the one below, q(z | x) q(z2 | z) ..., and "
                f"this guide draws {', '.join(latents)} in that order")
    for name in latents:
        for flag, which, d in (("guide", "q", guide.nodes[name]["fn"]), ("prior", "p", model.nodes[name]["fn"])):
            if not _diagonal_normal(d) and not (len(latents) == 1 and _over_diagonal_normal(d)):
                value = getattr(config, flag)
                density = f"q({name} | .)" if which == "q" else f"p({name})"
                why = (f"{density} is a flow, whose density does not factor over the latent dimensions into the "
                       "per-dimension bins; its base space is coded for one stochastic layer (docs/compression.md)"
                       if isinstance(d, dist.TransformedDistribution)
                       else f"the bins code {density} one dimension at a time, as a diagonal Gaussian")
                return f"--{flag} {value}: {why}; --{flag} normal is coded"
    if not _binary_pixels(model.nodes["x"]["fn"]):
        return (f"--likelihood {config.likelihood}: pixels are coded as bits given z "
                "(--likelihood bernoulli or pixelcnn)")
    if k > 1 and len(latents) > 1:
        return (f"--layers {len(latents)} with --k {k}: importance sampling is coded for one stochastic layer; a "
                "hierarchy codes at its ELBO (--k 1)")
    return None


# The latent bins, and each Gaussian on them as an integer CDF


@lru_cache(maxsize=4)
def _standard_grid(precision: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges (2^P + 1,), from -inf to inf, of 2^P bins of equal mass under N(0, 1), and their centres (2^P,)."""
    normal, bins = NormalDist(), 1 << precision
    edges = np.array([-math.inf, *(normal.inv_cdf(k / bins) for k in range(1, bins)), math.inf])
    return edges, np.array([normal.inv_cdf((k + 0.5) / bins) for k in range(bins)])


class _Grid:
    """The bins of one latent site: per dimension d, 2^P bins of equal mass under N(mean_d, std_d^2), where the
    guide puts that dimension on the images coded (marginals): fine where the draws land, whatever the prior."""

    def __init__(self, precision: int, mean: np.ndarray, std: np.ndarray):
        edges, centres = _standard_grid(precision)
        mean, std = mean.astype(np.float64)[:, None], std.astype(np.float64)[:, None]
        self.precision, self.width = precision, len(mean)
        self.edges = mean + std * edges  # (D, 2^P + 1), -inf and inf at the ends
        self.centres64 = mean + std * centres  # (D, 2^P), float64
        self.centres = torch.from_numpy(self.centres64).float()  # (D, 2^P): where the networks evaluate z
        self.dims = np.arange(self.width)

    def points(self, k: np.ndarray) -> torch.Tensor:
        """The centres of bins k (..., D): float32 (..., D)."""
        return self.centres[torch.from_numpy(self.dims), torch.from_numpy(k)]


@lru_cache(maxsize=1)
def _phi_table() -> np.ndarray:
    """The normal CDF times 2^32, rounded, every 2^-10 from -8 to 8 (and one point past): int64."""
    steps = 2 * _PHI_RANGE << _PHI_STEP_BITS
    t = [-_PHI_RANGE + i / (1 << _PHI_STEP_BITS) for i in range(steps + 2)]
    return np.array([round(0.5 * math.erfc(-v / math.sqrt(2)) * 2 ** 32) for v in t], dtype=np.int64)


def _integer_cdf(edges: np.ndarray, loc: np.ndarray, scale: np.ndarray, k: np.ndarray, spread: int) -> np.ndarray:
    """C(k) of Gaussians (loc, scale) on bins with these edges: from the rounded standardized edge by integers alone
    (a table of the normal CDF, interpolated), plus k (each bin's floor of 1)."""
    t = (edges - loc) / scale
    s = np.rint(np.clip(t, -_PHI_RANGE, _PHI_RANGE) * (1 << _T_BITS)).astype(np.int64) + (_PHI_RANGE << _T_BITS)
    shift = _T_BITS - _PHI_STEP_BITS
    index, rest = s >> shift, s & ((1 << shift) - 1)
    table = _phi_table()
    phi = table[index] + (((table[index + 1] - table[index]) * rest) >> shift)  # 2^32 Phi(t)
    return ((phi * spread) >> 32) + k


class _Bins:
    """A diagonal Gaussian (loc, scale broadcast to `shape`) discretized onto the latent bins: the integer CDF C(k).

    C(0) = 0, C(2^P) = 2^24 and C(k+1) - C(k) >= 1, so every bin can be coded. C is computed from the rounded
    standardized edge with integers only (a table of the normal CDF, interpolated): the same value wherever it
    is computed, which float transcendental functions vectorized over arrays of other lengths do not promise.
    """

    def __init__(self, grid: _Grid, loc: np.ndarray, scale: np.ndarray, shape: tuple):
        self.grid, self.precision, self.shape = grid, grid.precision, shape
        self.loc, self.scale = loc, scale
        self.spread = (1 << FINE_BITS) - (1 << grid.precision)  # CDF mass left after every bin's floor of 1

    def cdf(self, k: np.ndarray) -> np.ndarray:
        return _integer_cdf(self.grid.edges[self.grid.dims, k], self.loc, self.scale, k, self.spread)

    def interval(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """C(k) and C(k + 1): each bin's share of the 2^24."""
        return self.cdf(k), self.cdf(k + 1)

    def find(self, u: np.ndarray) -> np.ndarray:
        """The bins k with C(k) <= u < C(k + 1): binary search, one bit of k at a time."""
        k = np.zeros(np.broadcast_shapes(u.shape, self.shape), dtype=np.int64)
        for bit in reversed(range(self.precision)):
            trial = k + (1 << bit)
            k = np.where(self.cdf(trial) <= u, trial, k)
        return k

    def widened(self, factor: float) -> _Bins:
        """The same Gaussians with their deviations `factor` times wider."""
        return _Bins(self.grid, self.loc, self.scale * factor, self.shape)

    def log_prob(self, k: np.ndarray) -> np.ndarray:
        """log of each vector of bins' probability, in nats: summed over the last dimension."""
        low, high = self.interval(k)
        return (np.log(high - low) - FINE_BITS * math.log(2)).sum(-1)

    def log_mass(self, k: np.ndarray) -> np.ndarray:
        """log of each vector of bins' integer mass (of 2^24), summed over the last dimension: int64, in units
        of 2^-16 nats, computed with integers only (networks.ln)."""
        low, high = self.interval(k)
        return networks.ln(high - low).sum(-1)


class _ChainBins(_Bins):
    """A Gaussian with a full covariance L L^T over the latent dimensions (per image: mean (B, D), L (B, D, D)
    lower triangular) on the bins, one dimension at a time in their order: bin k_d has the mass of the normal
    conditional on the centres of the bins k_<d, N(mean_d + sum_j<d W_dj (c_j - mean_j), L_dd^2), with
    W = I - diag(L) L^-1 strictly lower triangular. The product of those masses is a distribution over the bins.

    Each conditional mean is summed dimension by dimension with numpy's elementwise arithmetic, in one order
    whatever the array: the same bits wherever it is computed, as the CDF's integers need.
    """

    def __init__(self, grid: _Grid, loc: np.ndarray, scale: np.ndarray, weights: np.ndarray, shape: tuple):
        super().__init__(grid, loc, scale, shape)
        self.weights = weights  # W (B, D, D)

    def _shift(self, loc: np.ndarray, k: np.ndarray, j: int) -> np.ndarray:
        """loc with dimension j's bins k[..., j] added to the conditional means of the dimensions after it."""
        deviation = self.grid.centres64[j, k[..., j]] - self.loc[..., j]
        return loc + self.weights[..., :, j] * deviation[..., None]

    def _conditional_locs(self, k: np.ndarray) -> np.ndarray:
        loc = np.broadcast_to(self.loc, k.shape).copy()
        for j in range(self.grid.width - 1):
            loc = self._shift(loc, k, j)
        return loc

    def cdf(self, k: np.ndarray) -> np.ndarray:
        raise TypeError("a chained Gaussian's bins have no CDF of their own: ask interval(k), given all of k")

    def interval(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loc, dims = self._conditional_locs(k), self.grid.dims
        return tuple(_integer_cdf(self.grid.edges[dims, b], loc, self.scale, b, self.spread) for b in (k, k + 1))

    def find(self, u: np.ndarray) -> np.ndarray:
        """The bins, dimension by dimension: each given the ones before it found."""
        shape = np.broadcast_shapes(u.shape, self.shape)
        k, u = np.zeros(shape, dtype=np.int64), np.broadcast_to(u, shape)
        loc, scale = np.broadcast_to(self.loc, shape).copy(), np.broadcast_to(self.scale, shape)
        for d in range(self.grid.width):
            edges, k_d = self.grid.edges[d], k[..., d]
            for bit in reversed(range(self.precision)):
                trial = k_d + (1 << bit)
                below = _integer_cdf(edges[trial], loc[..., d], scale[..., d], trial, self.spread) <= u[..., d]
                k_d = np.where(below, trial, k_d)
            k[..., d] = k_d
            if d < self.grid.width - 1:
                loc = self._shift(loc, k, d)
        return k

    def widened(self, factor: float) -> _ChainBins:
        return _ChainBins(self.grid, self.loc, self.scale * factor, self.weights, self.shape)


def _bins_of(d: dist.Distribution, grid: _Grid, shape: tuple) -> _Bins:
    """A latent site's diagonal Gaussian (a flow's: its base) on its bins, broadcast to shape (..., D)."""
    normal = d.base_dist.base_dist if isinstance(d, dist.TransformedDistribution) else d.base_dist
    loc = normal.loc.detach().cpu().double().numpy()
    scale = normal.scale.detach().cpu().double().numpy()
    return _Bins(grid, loc, scale, shape)


# Coding primitives on constriction's stack


def _models():
    import constriction  # optional for the rest of the package

    return constriction.stream.model


# A 24-bit uniform goes on the stack as two 12-bit halves, in one of two orders. A symbol coded with p (pushed, or
# popped back by the decoder) puts its low half on top; a draw from q (popped, or given back by the decoder) takes
# its high half, which picks the bin, from the top. So the bin of the next draw comes from the low half of the last
# symbol pushed, the place inside its bin popped from the coded x: random bits. The other way round the draw's bin
# would copy the bin of the symbol pushed last, and each image's draw would be the quantiles of the one before, as
# dependent across the latent dimensions as the images' posteriors are (measured on conv32 at K = 1, 2000 images:
# 2.0 bits an image above the -ELBO; this way 0.16, and 0.30 with uniforms from a random generator).
_HALF = FINE_BITS // 2


def _pop_fine(coder, shape: tuple, draw: bool) -> np.ndarray:
    """Uniforms of 24 bits (shape): a draw's (draw=True, high half first) or a coded symbol's (low half first)."""
    half, n = _models().Uniform(1 << _HALF), math.prod(shape)
    first, second = coder.decode(half, n).astype(np.int64), coder.decode(half, n).astype(np.int64)
    high, low = (first, second) if draw else (second, first)
    return ((high << _HALF) | low).reshape(shape)


def _push_fine(coder, u: np.ndarray, draw: bool) -> None:
    """The inverse of _pop_fine."""
    half, u = _models().Uniform(1 << _HALF), u.ravel()
    high, low = (u >> _HALF).astype(np.int32), (u & ((1 << _HALF) - 1)).astype(np.int32)
    second, first = (low, high) if draw else (high, low)
    coder.encode_reverse(second, half)
    coder.encode_reverse(first, half)


def _push_uniform(coder, r: np.ndarray, sizes: np.ndarray) -> None:
    """r uniform on 0 .. size - 1 each; a size of 1 holds no information and is not coded."""
    keep = sizes.ravel() > 1
    coder.encode_reverse(r.ravel()[keep].astype(np.int32), _models().Uniform(), sizes.ravel()[keep].astype(np.int32))


def _pop_uniform(coder, sizes: np.ndarray) -> np.ndarray:
    keep, r = sizes.ravel() > 1, np.zeros(sizes.size, dtype=np.int64)
    r[keep] = coder.decode(_models().Uniform(), sizes.ravel()[keep].astype(np.int32))
    return r.reshape(sizes.shape)


def _pop_bins(coder, bins: _Bins, draw: bool) -> np.ndarray:
    """Bins popped with their probabilities: a draw z ~ q taking bits back (draw=True), or decoding a pushed z.

    A 24-bit uniform u picks the bin k with C(k) <= u < C(k + 1); its place u - C(k) inside the bin goes back on
    the stack, so the net cost is -log2 of the bin's probability.
    """
    u = _pop_fine(coder, bins.shape, draw)
    k = bins.find(u)
    low, high = bins.interval(k)
    _push_uniform(coder, u - low, high - low)
    return k


def _push_bins(coder, k: np.ndarray, bins: _Bins, draw: bool) -> None:
    """Push bins k with their probabilities: coding z, or giving back a draw's bits (draw=True); undoes _pop_bins."""
    low, high = bins.interval(k)
    _push_fine(coder, low + _pop_uniform(coder, high - low), draw)


def _pixel_probabilities(likelihood: dist.Distribution, batch: int, exact: bool = False) -> np.ndarray:
    """P(pixel = 1 | z) of independent Bernoulli pixels, (784, B) float64: pixel-major, the order the
    autoregressive likelihood's pixels are popped in. exact: from the fixed-point logits by an integer table
    (integers / 2^32), else the float network's sigmoid."""
    if exact:
        logits = networks.to_int(likelihood.base_dist.logits.expand(batch, *IMAGE_SHAPE), networks.OUT_BITS)
        probs = networks.sigmoid(logits, networks.OUT_BITS).double() * 2.0 ** -networks.PROB_BITS
        return probs.reshape(batch, PIXELS).T.numpy()
    probs = likelihood.base_dist.probs.expand(batch, *IMAGE_SHAPE)
    return probs.reshape(batch, PIXELS).T.double().numpy()


def _probability(logit: torch.Tensor) -> np.ndarray:
    """P(pixel = 1) from a logit, as encoder and decoder both compute it."""
    return torch.sigmoid(logit).double().numpy()


def _push_pixels(coder, x: np.ndarray, likelihood: dist.Distribution, exact: bool = False) -> None:
    """Push images (B, 28, 28) with p(x | z): each pixel's probability from z alone, or (the autoregressive
    likelihood) given the pixels before it, from the pixel loop the decoder runs, filled with the known pixels."""
    if isinstance(likelihood, AutoregressiveBernoulli):
        known, rows = torch.from_numpy(x).to(likelihood.features.dtype), []

        def known_pixel(i: int, j: int, logit: torch.Tensor) -> torch.Tensor:
            rows.append(_probability(logit))  # pixel (i, j)'s probabilities, in the order the decoder pops them
            return known[:, i, j]

        likelihood.fill(known_pixel, (len(x),))
        probs = np.stack(rows)
    else:
        probs = _pixel_probabilities(likelihood, len(x), exact)
    pixels = x.reshape(len(x), PIXELS).T.ravel().astype(np.int32)
    coder.encode_reverse(pixels, _models().Bernoulli(perfect=False), probs.ravel())


def _pop_pixels(coder, likelihood: dist.Distribution, batch: int, exact: bool = False) -> np.ndarray:
    """Images (B, 28, 28) uint8 popped with p(x | z): all pixels at once where each is independent given z, else
    pixel by pixel (the first pixel of every image, then the second ...)."""
    model = _models().Bernoulli(perfect=False)
    if isinstance(likelihood, AutoregressiveBernoulli):
        filled = likelihood.fill(lambda i, j, logit: torch.from_numpy(coder.decode(model, _probability(logit))),
                                 (batch,))
        return filled.reshape(batch, *IMAGE_SHAPE[1:]).to(torch.uint8).numpy()
    pixels = coder.decode(model, _pixel_probabilities(likelihood, batch, exact).ravel()).astype(np.uint8)
    return np.ascontiguousarray(pixels.reshape(PIXELS, batch).T).reshape(batch, *IMAGE_SHAPE[1:])  # as encoded: the
    # networks and the sums over pixels must see the same memory layout on both sides


# The program's distributions, and the order they are coded in


def _shifts(k: int, width: int) -> np.ndarray:
    """The K draws' offsets (K, D) on the 24-bit uniforms: 0 for the first, pseudo-random for the rest."""
    words = np.frombuffer(hashlib.shake_256(SHIFT_TAG + f" {k} {width}".encode()).digest(4 * k * width), dtype="<u4")
    shifts = (words.astype(np.int64) & ((1 << FINE_BITS) - 1)).reshape(k, width)
    shifts[0] = 0
    return shifts


class _Program:
    """A run's model and guide, asked for one site's distribution at a time: each runs until that site and stops
    (poutine.escape), with the latent sites known so far conditioned on their bins' centres."""

    def __init__(self, trained: TrainedVAE, grids: dict):
        self.vae, self.grids = trained.vae, grids  # site -> _Grid
        self.sites = self.vae.sites  # z (next to x), z2, ... zL
        self.to_z = None  # g, with z = g(e), where the prior of a one-layer run is a flow: its bins are e's
        self.base_space = False  # whether z is coded in the prior's base space, by the fitted proposal
        if len(self.sites) == 1:
            blank = torch.zeros(1, *trained.config.shape(), device=trained.device)
            label = torch.zeros(1, dtype=torch.long, device=trained.device) if self.vae.conditional else None
            with torch.no_grad():
                prior, q = self.site("model", "z", blank, label, {}), self.site("guide", "z", blank, label, {})
            if isinstance(prior, dist.TransformedDistribution):
                self.to_z = dist.transforms.ComposeTransform(prior.transforms)
            self.base_space = self.to_z is not None or not _diagonal_normal(q)

    def _points(self, values: dict) -> dict:
        """Bins (numpy) as their centres (as z = g(e) where the bins are the flow's base e); draws already
        continuous (tensors) as they are."""
        points = {name: self.grids[name].points(v) if isinstance(v, np.ndarray) else v for name, v in values.items()}
        if self.to_z is not None and isinstance(values.get("z"), np.ndarray):
            points["z"] = self.to_z(points["z"])
        return points

    def site(self, which: str, name: str, x: torch.Tensor, y: torch.Tensor | None, values: dict,
             samples: int = 0) -> dist.Distribution:
        """The distribution of site `name` of the model or the guide (`which`) given x, y and the bins in values."""
        program = poutine.escape(poutine.condition(getattr(self.vae, which), data=self._points(values)),
                                 escape_fn=lambda msg: msg["name"] == name)
        try:
            with pyro.plate("samples", samples, dim=-2) if samples else nullcontext():
                program(x, y)
        except NonlocalExit as stop:
            stop.reset_stack()
            return stop.site["fn"]
        raise CompressError(f"the run's {which} has no site {name!r}")

    def bins(self, which: str, name: str, x, y, values: dict, shape: tuple | None = None) -> _Bins:
        d = self.site(which, name, x, y, values)
        return _bins_of(d, self.grids[name], shape or (x.shape[0], *d.event_shape))

    def proposal(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian that z's bins are drawn from given x: q(z | x)'s own loc and scale (B, D); or, coded in the
        base space (a flow in the prior or the guide), r(e | x): the mean (B, D) and the Cholesky factor (B, D, D)
        of the covariance of FIT_DRAWS draws of q(z | x) carried to e = g^-1(z), drawn from FIT_SEED so that
        encoder and decoder fit the same r. The flow prior's g^-1 correlates the dimensions of e: a diagonal r's
        -IWAE_32 is 0.8 nats an image above a full one's (pixelcnn_flow_iaf, 100 images, widening 1.0:
        experiments/base_space_proposal.py)."""
        q = self.site("guide", "z", x, y, {})
        if not self.base_space:
            return q.base_dist.loc, q.base_dist.scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FIT_SEED)
            z = q.sample((FIT_DRAWS,))  # (M, B, D)
        e = (z if self.to_z is None else self.to_z.inv(z)).double()
        mean, deviation = e.mean(0), e - e.mean(0)
        covariance = torch.einsum("mbi,mbj->bij", deviation, deviation) / (FIT_DRAWS - 1)
        jitter = 1e-8 * torch.eye(e.shape[-1], dtype=e.dtype)  # a floor on the deviations: 1e-4
        return mean, torch.linalg.cholesky(covariance + jitter)

    def proposal_bins(self, x: torch.Tensor, y: torch.Tensor | None) -> _Bins:
        loc, spread = (v.detach().cpu().double() for v in self.proposal(x, y))
        if spread.dim() == loc.dim():  # diagonal
            return _Bins(self.grids["z"], loc.numpy(), spread.numpy(), tuple(loc.shape))
        scale = torch.diagonal(spread, dim1=-2, dim2=-1)
        inverse = torch.linalg.solve_triangular(spread, torch.eye(loc.shape[-1], dtype=loc.dtype), upper=False)
        weights = torch.eye(loc.shape[-1], dtype=loc.dtype) - scale[..., None] * inverse
        weights = torch.tril(weights, diagonal=-1)  # exactly 0 on and above the diagonal
        return _ChainBins(self.grids["z"], loc.numpy(), scale.numpy(), weights.numpy(), tuple(loc.shape))


def marginals(trained: TrainedVAE, images: np.ndarray, labels: np.ndarray | None = None) -> tuple[float, ...]:
    """Where the guide puts each latent dimension on these images: the mean and standard deviation of its
    mixture over the first MARGINAL_IMAGES images, site by site (z's means, then z's deviations, then z2's ...),
    rounded to float16 as a file stores them. Each site's bins are cut for them.

    Each layer's q given the one below is taken at one draw of that layer per image (a fixed seed).
    """
    program = _Program(trained, {})
    x, y = _tensors(images[:MARGINAL_IMAGES], None if labels is None else labels[:MARGINAL_IMAGES])
    values, moments = {}, []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for site in program.sites:  # bottom-up: q(z | x), q(z2 | z), ...
            d = program.site("guide", site, x, y, values)
            if site == "z" and program.base_space:  # MAX_BATCH images at a time: the fit holds FIT_DRAWS draws of each
                parts = [program.proposal(x[i:i + MAX_BATCH], None if y is None else y[i:i + MAX_BATCH])
                         for i in range(0, len(x), MAX_BATCH)]
                loc, scale = (torch.cat([part[j] for part in parts]) for j in (0, 1))
            else:  # q's own loc and scale: the proposal where no flow is coded in a base space
                loc, scale = d.base_dist.loc, d.base_dist.scale
            loc, scale = loc.double(), scale.double()
            if scale.dim() > loc.dim():  # a Cholesky factor: each dimension's deviation is its row's length
                scale = scale.square().sum(-1).sqrt()
            mean = loc.mean(0)
            std = ((scale ** 2 + loc ** 2).mean(0) - mean ** 2).clamp(min=0).sqrt().clamp(min=1e-3)
            moments += [*mean.half().tolist(), *std.half().tolist()]
            values[site] = d.sample()
    return tuple(moments)


def _grids(trained: TrainedVAE, precision: int, moments: tuple[float, ...]) -> dict:
    """Each latent site's _Grid from the marginals a file records."""
    values, grids, start = np.array(moments, dtype=np.float64), {}, 0
    for site, width in zip(trained.vae.sites, trained.config.layer_dims()):
        mean, std = values[start:start + width], values[start + width:start + 2 * width]
        if not np.all(std > 0):
            raise CompressError("damaged header: a latent dimension's deviation is not positive")
        grids[site], start = _Grid(precision, mean, std), start + 2 * width
    return grids


class _BitsBack:
    """Codes batches of images (and labels) on one ANS stack: encode_batch, and decode_batch in reverse."""

    def __init__(self, trained: TrainedVAE, coder, grids: dict, k: int, widen: float = 1.0, exact: bool = False):
        self.program, self.coder, self.k, self.widen = _Program(trained, grids), coder, k, widen
        self.exact = exact  # the coding networks are the fixed-point copies (exact_networks): integer weights too
        self.labelled = trained.vae.conditional

    def encode_batch(self, images: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """Push images (B, 28, 28) (and labels (B,)); returns the bound each costs, in nats: -log of its importance
        estimate (K > 1) or log q - log p at its own draws (K = 1)."""
        program, coder, sites = self.program, self.coder, self.program.sites
        x, y = _tensors(images, labels)
        q = program.proposal_bins(x, y)
        values = {}
        if self.k > 1:
            values["z"], bound = self._draw_importance(q.widened(self.widen), x, y)
        else:
            values["z"] = _pop_bins(coder, q, draw=True)
            bound = q.log_prob(values["z"])
        likelihood = program.site("model", "x", x, y, values)
        _push_pixels(coder, images, likelihood, self.exact)
        if self.k == 1:
            bound = bound - (networks.log_bernoulli(likelihood.base_dist.logits, x).numpy() * 2.0 ** -networks.LOG_BITS
                             if self.exact else likelihood.log_prob(x).double().numpy())
        for below, site in zip(sites, sites[1:]):  # Bit-Swap: draw z_l+1 with what z_l and x pushed, then push z_l
            q = program.bins("guide", site, x, y, values)
            values[site] = _pop_bins(coder, q, draw=True)
            p = program.bins("model", below, x, y, values)
            _push_bins(coder, values[below], p, draw=False)
            bound += q.log_prob(values[site]) - p.log_prob(values[below])
        top = program.bins("model", sites[-1], x, y, values)
        _push_bins(coder, values[sites[-1]], top, draw=False)
        if self.k == 1:
            bound = bound - top.log_prob(values[sites[-1]])
        if self.labelled:
            label_prior = program.site("model", "y", x, y, {})
            coder.encode_reverse(labels.astype(np.int32), _models().Categorical(perfect=False),
                                 _label_probabilities(label_prior, len(x)))
            bound = bound - label_prior.log_prob(y).double().numpy()
        return bound

    def decode_batch(self, size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Pop the last batch pushed: images (B, 28, 28) uint8 and labels (B,) or None; the bits back are pushed."""
        program, coder, sites = self.program, self.coder, self.program.sites
        blank = torch.zeros(size, *IMAGE_SHAPE)
        labels = y = None
        if self.labelled:
            probabilities = _label_probabilities(program.site("model", "y", blank, None, {}), size)
            labels = coder.decode(_models().Categorical(perfect=False), probabilities).astype(np.int64)
            y = torch.from_numpy(labels)
        values = {sites[-1]: _pop_bins(coder, program.bins("model", sites[-1], blank, y, {}), draw=False)}
        for below, site in reversed(list(zip(sites, sites[1:]))):
            values[below] = _pop_bins(coder, program.bins("model", below, blank, y, values), draw=False)
            _push_bins(coder, values[site], program.bins("guide", site, blank, y, values), draw=True)
        images = _pop_pixels(coder, program.site("model", "x", blank, y, {"z": values["z"]}), size, self.exact)
        x = torch.from_numpy(images).float().reshape(-1, *IMAGE_SHAPE)
        q = program.proposal_bins(x, y)
        if self.k > 1:
            self._undraw_importance(values["z"], q.widened(self.widen), x, y)
        else:
            _push_bins(coder, values["z"], q, draw=True)
        return images, labels

    # BB-IS with coupled draws (Ruan et al. 2021): one uniform u per latent dimension; draw k is the bin of
    # u + shift_k (mod 2^24), each marginally the proposal q (widened). Pop u, pop j ~ w_j / sum_k w_k, push u_j's
    # place in its bin and j uniformly; the caller then pushes x and z_j as for one draw. Net: -log (1/K sum_k w_k).

    def _draw_importance(self, q: _Bins, x: torch.Tensor, y: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        coder, rows = self.coder, np.arange(len(x))
        u = _pop_fine(coder, q.shape, draw=True)
        draws, log_w = self._weights(u, q, x, y)
        j = coder.decode(_models().Categorical(perfect=False), self._softmax(log_w)).astype(np.int64)
        z, u_j = draws[j, rows], (u + _shifts(self.k, q.shape[-1])[j]) & ((1 << FINE_BITS) - 1)
        low, high = q.interval(z)
        _push_uniform(coder, u_j - low, high - low)
        coder.encode_reverse(j.astype(np.int32), _models().Uniform(self.k))
        log_mean = np.logaddexp.reduce(self._nats(log_w), axis=1) - math.log(self.k)
        return z, -log_mean

    def _undraw_importance(self, z: np.ndarray, q: _Bins, x: torch.Tensor, y: torch.Tensor | None) -> None:
        coder, rows = self.coder, np.arange(len(x))
        j = coder.decode(_models().Uniform(self.k), len(x)).astype(np.int64)
        low, high = q.interval(z)
        u_j = low + _pop_uniform(coder, high - low)
        u = (u_j - _shifts(self.k, q.shape[-1])[j]) & ((1 << FINE_BITS) - 1)
        draws, log_w = self._weights(u, q, x, y)
        if not np.array_equal(draws[j, rows], z):
            raise ValueError("a draw does not come back")
        coder.encode_reverse(j.astype(np.int32), _models().Categorical(perfect=False), self._softmax(log_w))
        _push_fine(coder, u, draw=True)

    def _weights(self, u: np.ndarray, q: _Bins, x: torch.Tensor, y: torch.Tensor | None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The K coupled draws (K, B, D) from u (B, D), and their log weights log p(x, z_k) - log q(z_k | x), (B, K):
        in nats (float networks), or (exact) integers in units of 2^-16 nats from integer arithmetic alone."""
        program, k, batch = self.program, self.k, len(x)
        shape = (k, *q.shape)
        draws = q.find((u + _shifts(k, q.shape[-1])[:, None]) & ((1 << FINE_BITS) - 1))
        prior = program.bins("model", "z", x, y, {}, shape)
        if self.exact:
            log_w = prior.log_mass(draws) - q.log_mass(draws)  # (K, B), the 2^-24 of both masses cancel
        else:
            log_w = prior.log_prob(draws) - q.log_prob(draws)
        per_pass = max(1, SAMPLES_PER_PASS // batch)  # draws per decoder call: depends on K and B alone
        for start in range(0, k, per_pass):
            part = draws[start:start + per_pass]
            likelihood = program.site("model", "x", x, y, {"z": part}, samples=len(part))
            if self.exact:
                log_w[start:start + len(part)] += networks.log_bernoulli(likelihood.base_dist.logits, x).numpy()
            else:
                log_w[start:start + len(part)] += likelihood.log_prob(x).double().numpy()
        return draws, log_w.T

    def _softmax(self, log_w: np.ndarray) -> np.ndarray:
        return networks.softmax(log_w) if self.exact else _softmax(log_w)

    def _nats(self, log_w: np.ndarray) -> np.ndarray:
        return log_w * 2.0 ** -networks.LOG_BITS if self.exact else log_w


def _softmax(log_w: np.ndarray) -> np.ndarray:
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    return np.ascontiguousarray(w / w.sum(axis=1, keepdims=True))  # constriction reads the rows as laid out


def _label_probabilities(prior: dist.Distribution, batch: int) -> np.ndarray:
    """p(y) of each image, (B, 10) float64, from the model's own label site."""
    return np.ascontiguousarray(prior.probs.expand(batch, NUM_CLASSES).double().numpy())


def _tensors(images: np.ndarray, labels: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.from_numpy(images).float().reshape(-1, *IMAGE_SHAPE)
    return x, None if labels is None else torch.from_numpy(labels.astype(np.int64))


# The file


@dataclass(frozen=True)
class Header:
    """What a compressed file says about itself, before its ANS words."""

    run: str  # the run that encoded it, as given to decode by default
    weights_sha256: bytes  # of the model's state_dict: decoding refuses other weights
    images_sha256: bytes  # of the (N, 28, 28) uint8 images (and the int64 labels): decoding checks what it restores
    num_images: int
    precision: int  # 2^precision bins per latent dimension
    max_batch: int
    seed_words: int  # pseudo-random 32-bit words that seeded the stack
    data_words: int  # 32-bit ANS words after the header
    k: int = 1  # importance samples per image
    layers: int = 1  # stochastic layers of the run
    labelled: bool = False  # the labels are coded too
    marginals: tuple = ()  # mean and deviation of each latent dimension (float16): its bins' frame (see marginals)
    widen: float = 1.0  # the importance proposal's deviations over q's (float16)
    exact: bool = False  # coded with the fixed-point networks (portable); False: float networks (format 2, PixelCNN)
    version: int = VERSION

    def pack(self) -> bytes:
        run, fields = self.run.encode(), (self.exact,) if self.version >= 3 else ()
        return (_HEADER if self.version >= 3 else _HEADER_2).pack(
            MAGIC, self.version, self.precision, self.k, self.layers, self.labelled, self.num_images, self.max_batch,
            self.seed_words, self.data_words, self.weights_sha256, self.images_sha256, len(run), len(self.marginals),
            self.widen, *fields) + run + np.array(self.marginals, dtype="<f2").tobytes()

    @property
    def size(self) -> int:
        """Bytes of the header."""
        return (_HEADER if self.version >= 3 else _HEADER_2).size + len(self.run.encode()) + 2 * len(self.marginals)

    def not_portable(self) -> str:
        """Why a file that fails to decode here may still be sound: how its coding networks computed."""
        if self.exact:
            return ""
        which = f"format {self.version}" if self.version < 3 else "an autoregressive likelihood's"
        return (f"; it was written ({which}) with floating-point coding networks, whose rounding depends on the "
                "CPU's kernels: it decodes only on a CPU (and torch) that picks the encoder's kernels, e.g. the "
                "machine that wrote it")


def read_header(data: bytes) -> Header:
    """The header of a compressed file; CompressError when data is not one, is cut short or holds impossible
    settings (checked before anything is allocated for it)."""
    if data[:len(MAGIC)] != MAGIC:
        raise CompressError("not a pyro_vae compressed file (no PVAEBB magic bytes at its start)")
    if len(data) <= len(MAGIC):
        raise CompressError(f"truncated: {len(data)} bytes, shorter than the header")
    version = data[len(MAGIC)]
    if version not in READABLE:
        old = " (the ELBO codec of 2026-11-28: decode it with that pyro_vae)" if version == 1 else ""
        raise CompressError(f"format version {version}{old}; this pyro_vae reads "
                            f"{' and '.join(f'version {v}' for v in READABLE)}")
    layout = _HEADER if version >= 3 else _HEADER_2
    if len(data) < layout.size:
        raise CompressError(f"truncated: {len(data)} bytes, shorter than the header")
    (_, _, precision, k, layers, labelled, n, max_batch, seed_words, data_words, weights, images, run_len,
     count, widen, *exact) = layout.unpack_from(data)
    if len(data) < layout.size + run_len + 2 * count:
        raise CompressError(f"truncated: {len(data)} bytes, shorter than the header")
    try:
        run = data[layout.size:layout.size + run_len].decode()
    except UnicodeDecodeError:
        raise CompressError("damaged header: the run's path is not text") from None
    moments = np.frombuffer(data, dtype="<f2", count=count, offset=layout.size + run_len)
    header = Header(run, weights, images, n, precision, max_batch, seed_words, data_words, k, layers, bool(labelled),
                    tuple(float(v) for v in moments), widen, bool(exact and exact[0]), version)
    expected = header.size + 4 * data_words
    if len(data) < expected:
        raise CompressError(f"truncated: {len(data)} bytes, the header announces {expected}")
    if len(data) > expected or not (1 <= precision <= 20) or not 1 <= max_batch <= LARGEST_BATCH or n < 1 \
            or not 1 <= k <= MAX_K or layers < 1 or labelled > 1 or not np.all(np.isfinite(moments)) \
            or not 0.5 <= widen <= 4 or (exact and exact[0] > 1):
        raise CompressError(f"damaged: {len(data)} bytes where the header announces {expected}, "
                            f"or settings out of range")
    if n > 32 * data_words:
        raise CompressError(f"damaged: the header claims {n} images, more than the {32 * data_words} bits of "
                            "coded words can hold (a file holds at least one bit per image)")
    _check_memory(n * (PIXELS + 8), f"{n} images")
    return header


def _check_memory(needed: int, what: str) -> None:
    """Refuse, before allocating, what would need more than half the memory this machine has available now."""
    from ..evaluate import available_memory

    available = available_memory(torch.device("cpu"))
    if needed > available // 2:
        raise CompressError(f"{what} would need {needed / 2 ** 30:.1f} GiB, more than half of the "
                            f"{available / 2 ** 30:.1f} GiB this machine has available")


def _working_bytes(trained: TrainedVAE, max_batch: int, k: int) -> int:
    """Memory a batch needs: the draws' integer arrays and the networks' activations of one pass."""
    from ..evaluate import activation_bytes

    width = sum(trained.config.layer_dims())
    per_draw, _ = activation_bytes(trained.vae, torch.zeros(1, *IMAGE_SHAPE, device=trained.device),
                                   torch.zeros(1, dtype=torch.long) if trained.vae.conditional else None)
    return max_batch * k * width * 8 * 16 + max(SAMPLES_PER_PASS, max_batch) * per_draw


def check_images(images) -> np.ndarray:
    """images as a C-contiguous uint8 array (N, 28, 28) of 0 and 1; BadImages naming what is wrong."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[1:] or len(images) == 0:
        raise BadImages(f"images must have shape (N, 28, 28) with N >= 1, not {images.shape}")
    if not (images.dtype == np.bool_ or np.issubdtype(images.dtype, np.integer)):
        raise BadImages(f"images must be a uint8 array of 0 and 1, not dtype {images.dtype}")
    if not np.isin(images, (0, 1)).all():
        others = np.setdiff1d(np.unique(images), (0, 1))
        raise BadImages(f"images must be binary (0 and 1), but also hold {others[:5].tolist()}"
                        f"{' ...' if len(others) > 5 else ''}")
    return np.ascontiguousarray(images, dtype=np.uint8)


def check_labels(labels, num_images: int) -> np.ndarray:
    """labels as an int64 array (N,) of digits 0-9; BadImages naming what is wrong."""
    labels = np.asarray(labels)
    if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
        raise BadImages(f"labels must be N = {num_images} integers, not {labels.dtype} {labels.shape}")
    if labels.size and not (0 <= labels.min() and labels.max() < NUM_CLASSES):
        raise BadImages(f"labels must be digits 0 to {NUM_CLASSES - 1}, not {labels.min()} .. {labels.max()}")
    return np.ascontiguousarray(labels, dtype=np.int64)


def weights_sha256(vae: torch.nn.Module) -> bytes:
    """SHA-256 of a model's state_dict (names, shapes, dtypes and values), the identity a file records."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        h.update(tensor.numpy().tobytes())
    return h.digest()


def _images_sha256(images: np.ndarray, labels: np.ndarray | None) -> bytes:
    h = hashlib.sha256(images.tobytes())
    if labels is not None:
        h.update(labels.astype("<i8").tobytes())
    return h.digest()


def batch_sizes(num_images: int, working_bits: int, max_batch: int, seed_bits: int | None = None) -> list[int]:
    """The batches, in coding order: from one image up to max_batch as the stack grows.

    A batch pops up to working_bits per image before it pushes; the seed holds seed_bits (default: one image's
    working bits), and each coded image adds at least ASSUMED_BITS_PER_IMAGE. The sizes depend on nothing but the
    numbers given, so the decoder computes the same batches.
    """
    seed_bits = working_bits if seed_bits is None else seed_bits
    sizes, done = [], 0
    while done < num_images:
        size = max(1, min(max_batch, (seed_bits + done * ASSUMED_BITS_PER_IMAGE) // working_bits))
        sizes.append(min(size, num_images - done))
        done += sizes[-1]
    return sizes


def _budget(trained: TrainedVAE, k: int) -> tuple[int, int]:
    """Bits one image pops before it pushes (all its layers' uniforms, and j), and the initial bits: the first
    layer's alone, since Bit-Swap pays each higher layer's draw with what x and the layer below pushed."""
    dims, index = trained.config.layer_dims(), FINE_BITS if k > 1 else 0
    return FINE_BITS * sum(dims) + index, FINE_BITS * dims[0] + index


def _seed_words(count: int) -> np.ndarray:
    """count pseudo-random 32-bit words, the same in every version of every library."""
    return np.frombuffer(hashlib.shake_256(SEED_TAG).digest(4 * count), dtype="<u4").astype(np.uint32)


@contextmanager
def _coding(vae: torch.nn.Module, exact: bool = False, device: str = "cpu"):
    """One thread, and the networks' fixed-point copies (exact; their sums on device) or the conv weights
    channels-last (faster here), while coding; the run as it came after."""
    before = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    if not exact:
        vae.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), networks.exact_networks(vae, device) if exact else nullcontext():
            yield
    finally:
        if not exact:
            vae.to(memory_format=torch.contiguous_format)
        torch.set_num_threads(before)


def portable(trained: TrainedVAE) -> bool:
    """Whether this run's files are coded with fixed-point networks (decode on any CPU): every family but the
    autoregressive likelihood's (and --label-at input), whose networks stay in floating point."""
    return networks.why_not_exact(trained.vae) is None


def default_widen(trained: TrainedVAE) -> float:
    """The proposal's widening with K > 1: BASE_SPACE_WIDEN where z is coded in a flow's base space, else
    DEFAULT_WIDEN."""
    return BASE_SPACE_WIDEN if _Program(trained, {}).base_space else DEFAULT_WIDEN


def default_k(trained: TrainedVAE) -> int:
    """DEFAULT_K for a one-layer run, 1 for a hierarchy (coded at its ELBO)."""
    return DEFAULT_K if trained.config.layers == 1 else 1


def _load(run, k: int | None = None) -> tuple[TrainedVAE, str]:
    """The run to code with (on the CPU) and the path a file records for it."""
    if isinstance(run, TrainedVAE):
        if run.device.type != "cpu":
            raise CompressError("load the run on the CPU to compress: GPU kernels need not repeat a probability "
                                "bit for bit")
        trained, path = run, str(run.config.out)
    else:
        trained, directory = load(run, device="cpu"), run_directory(run).resolve()
        path = str(Path("pretrained") / directory.relative_to(PRETRAINED)) \
            if directory.is_relative_to(PRETRAINED) else str(directory)
    reason = unsupported(trained, default_k(trained) if k is None else k)
    if reason:
        raise CompressError(f"cannot compress with this run: {reason}")
    return trained, path


def _bar(total: int, desc: str, progress: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress is None else not progress)


def encode(run, images, labels=None, *, k: int | None = None, widen: float | None = None,
           precision: int = PRECISION, max_batch: int = MAX_BATCH, progress: bool | None = None) -> bytes:
    """Compress binary images (N, 28, 28) losslessly with a run (a path or a loaded run): the file's bytes.

    A label-conditioned run codes the labels (N,) too. k: importance samples per image (default: default_k);
    widen: their proposal's deviations over q's (default with k > 1: default_widen).
    """
    images = check_images(images)
    trained, path = _load(run, k)
    labels = _labels_for(trained, labels, len(images))
    return _encode(trained, path, images, labels, k=k, widen=widen, precision=precision, max_batch=max_batch,
                   progress=progress)[0]


def _labels_for(trained: TrainedVAE, labels, num_images: int) -> np.ndarray | None:
    if trained.vae.conditional and labels is None:
        raise BadImages("this run is label-conditioned (--conditional): give each image's label too")
    if not trained.vae.conditional and labels is not None:
        raise BadImages("labels were given, but this run does not model them (it is not --conditional)")
    return None if labels is None else check_labels(labels, num_images)


def setting_problems(k: int | None, widen: float | None, precision: int, max_batch: int) -> list[str]:
    """Each coding setting out of range, named by its flag; None: the default."""
    problems = [f"--{name} must be {low} to {high}, not {value}" for name, value, low, high in (
        ("k", k, 1, MAX_K), ("widen", widen, 0.5, 4), ("precision", precision, 1, 20),
        ("max-batch", max_batch, 1, LARGEST_BATCH)) if value is not None and not low <= value <= high]
    if k == 1 and widen not in (None, 1):
        problems.append(f"--widen {widen} widens the proposal of K > 1 draws; with --k 1 the draw is q's own")
    return problems


def _settings(trained: TrainedVAE, k: int | None, widen: float | None, precision: int, max_batch: int
              ) -> tuple[int, float]:
    """K and the widening to code with (the defaults where None), as a file stores them."""
    problems = setting_problems(k, widen, precision, max_batch)
    if problems:
        raise CompressError("; ".join(problems))
    k = default_k(trained) if k is None else k
    widen = (default_widen(trained) if k > 1 else 1.0) if widen is None else widen
    return k, float(np.float16(widen))


def _encode(trained: TrainedVAE, path: str, images: np.ndarray, labels: np.ndarray | None, *, k: int | None = None,
            widen: float | None = None, precision: int = PRECISION, max_batch: int = MAX_BATCH,
            progress: bool | None = None) -> tuple[bytes, np.ndarray]:
    """The file's bytes, and the bound each image was coded at (bits): -log of its own importance estimate."""
    import constriction

    k, widen = _settings(trained, k, widen, precision, max_batch)
    _check_memory(_working_bytes(trained, max_batch, k), f"batches of {max_batch} images x {k} draws")
    working_bits, seed_bits = _budget(trained, k)
    seed_words = -(-seed_bits // 32)
    coder = constriction.stream.stack.AnsCoder(_seed_words(seed_words), seal=True)
    moments = marginals(trained, images, labels)
    exact = portable(trained)
    codec = _BitsBack(trained, coder, _grids(trained, precision, moments), k, widen, exact)
    bounds, start = [], 0
    with _coding(trained.vae, exact), _bar(len(images), "encode", progress) as bar:
        for size in batch_sizes(len(images), working_bits, max_batch, 32 * seed_words):
            bounds.append(codec.encode_batch(images[start:start + size],
                                             None if labels is None else labels[start:start + size]))
            start += size
            bar.update(size)
    words = coder.get_compressed().astype("<u4")
    if 32 * len(words) < len(images):
        raise CompressError(f"{len(images)} images coded in {32 * len(words)} bits: the format holds at least one "
                            "bit per image")
    header = Header(path, weights_sha256(trained.vae), _images_sha256(images, labels), len(images), precision,
                    max_batch, seed_words, len(words), k, trained.config.layers, labels is not None, moments, widen,
                    exact)
    return header.pack() + words.tobytes(), np.concatenate(bounds) / math.log(2)


def decode(run, data: bytes, *, labels: bool = False, progress: bool | None = None, device: str = "cpu"):
    """The images (N, 28, 28) uint8 that encode compressed into data; run None: the run data records.

    labels=True: (images, labels), the labels (N,) int64 of a label-conditioned run's file, else None.
    device: where the fixed-point coding networks compute their sums (a format-3 file's: "cuda" decodes a file
    written on a CPU exactly; the rest of the codec runs on the CPU).
    """
    import constriction

    header = read_header(data)
    try:
        trained, _ = _load(header.run if run is None else run, header.k)
    except CheckpointError as e:
        raise CompressError(f"encoded with the run {header.run}, which cannot be loaded here ({e}); "
                            "give its path (--run)") from e
    if weights_sha256(trained.vae) != header.weights_sha256:
        used = header.run if run is None else "the run given" if isinstance(run, TrainedVAE) else run
        raise CompressError(f"encoded with the run {header.run} (weights {header.weights_sha256.hex()[:12]}), but "
                            f"the weights of {used} differ ({weights_sha256(trained.vae).hex()[:12]})")
    widths = trained.config.layer_dims()
    if (header.layers, header.labelled, len(header.marginals)) != (len(widths), trained.vae.conditional,
                                                                    2 * sum(widths)):
        raise CompressError("damaged header: its layers, labels or latent marginals do not fit the run")
    _check_memory(_working_bytes(trained, header.max_batch, header.k),
                  f"batches of {header.max_batch} images x {header.k} draws")
    working_bits, seed_bits = _budget(trained, header.k)
    sizes = batch_sizes(header.num_images, working_bits, header.max_batch, 32 * header.seed_words)
    images = np.empty((header.num_images, *IMAGE_SHAPE[1:]), dtype=np.uint8)
    restored = np.empty(header.num_images, dtype=np.int64) if header.labelled else None
    end = header.num_images
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, dtype="<u4", offset=header.size)
                                                   .astype(np.uint32))
        if header.exact and not portable(trained):
            raise CompressError(f"written with fixed-point coding networks, which this run has none of "
                                f"({networks.why_not_exact(trained.vae)})")
        codec = _BitsBack(trained, coder, _grids(trained, header.precision, header.marginals), header.k, header.widen,
                          header.exact)
        if device != "cpu" and not header.exact:
            raise CompressError(f"--device {device}: this file's coding networks are floating-point ones, which "
                                "decode only on the CPU kernels that wrote it")
        with _coding(trained.vae, header.exact, device), _bar(header.num_images, "decode", progress) as bar:
            for size in reversed(sizes):  # a stack: the last batch coded comes off first
                images[end - size:end], batch_labels = codec.decode_batch(size)
                if restored is not None:
                    restored[end - size:end] = batch_labels
                end -= size
                bar.update(size)
        seed = coder.get_compressed(unseal=True)
    except (ValueError, RuntimeError, OverflowError, AssertionError, IndexError) as e:  # words not its own
        if not header.exact:
            raise CompressError(f"the coded words do not decode here ({e}){header.not_portable()}") from e
        raise CompressError(f"damaged: the coded words do not decode ({e})") from e
    if not np.array_equal(seed, _seed_words(header.seed_words)) or \
            _images_sha256(images, restored) != header.images_sha256:
        if not header.exact:
            raise CompressError(f"the decoded images do not match the checksum the file records{header.not_portable()}")
        raise CompressError("damaged: the decoded images do not match the checksum the file records")
    return (images, restored) if labels else images


from .cli import (binarized_test_images, binarized_test_split, build_parser, elbo_bits,  # noqa: E402
                  general_purpose_bits, labels_path, main, report)

__all__ = ["BadImages", "CompressError", "Header", "batch_sizes", "binarized_test_images", "binarized_test_split",
           "build_parser", "check_images", "check_labels", "decode", "elbo_bits", "encode", "general_purpose_bits",
           "labels_path", "main", "marginals", "portable", "read_header", "report", "unsupported", "weights_sha256"]
