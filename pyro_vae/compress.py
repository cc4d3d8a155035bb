"""Lossless compression of binary MNIST by bits-back coding with the trained model and guide.

Bits-back ANS (Townsend, Bird & Barber, ICLR 2019): for each image x, pop z from the stack with q(z | x)
(the bits back), push x with p(x | z), push z with p(z). Each latent dimension is cut into 2^precision bins
of equal mass under the N(0, 1) prior, so p(z) is uniform over bins; q(z | x) is discretized onto the same
bins and p(x | z) is evaluated at the bins' centres. A file then costs about -ELBO bits per image, plus the
initial bits that seed the stack and a small header. constriction's ANS stack coder does the coding.

Encoder and decoder must compute the same probabilities bit for bit: both run the networks on one thread
with the same batches in the same order, and a checksum of the images makes a decoder that did not
(another CPU, another torch) fail loudly instead of writing wrong images.

`python -m pyro_vae.compress RUN FILE` and `python -m pyro_vae.compress --decode FILE OUT.npy` are thin
shells over `encode(run, images) -> bytes` and `decode(run, data) -> images`.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyro.distributions as dist
import torch
from tqdm import tqdm

from .checkpoint import PRETRAINED, CheckpointError, load, run_directory, write_atomically
from .data import IMAGE_SHAPE, DataError, load_mnist
from .trained import TrainedVAE

MAGIC = b"PVAEBB"  # pyro_vae bits-back
VERSION = 1
# bits per latent dimension: 2^12 bins of equal prior mass, narrow beside q(z | x). Not more: constriction gives every
# bin at least 2^-24, so q leaks 2^(precision - 24) of its mass into far bins (measured on conv32, 2000 images: the
# file's excess over -ELBO is 0.2 bits an image at 12, 0.4 at 14, 1.5 at 16)
PRECISION = 12
MAX_BATCH = 100  # images per network call once the stack holds enough bits
NUM_THREADS = 1  # how torch splits a sum across threads changes its last bits: fixed, so both sides agree
SEED_TAG = b"pyro_vae bits-back initial bits"  # the pseudo-random words that seed the stack come from this
ASSUMED_BITS_PER_IMAGE = 64  # a floor on -ELBO in bits on MNIST (real models: 115 or more), for the batch ramp
PIXELS = math.prod(IMAGE_SHAPE)
_HEADER = struct.Struct("<6sBBIIII32s32sH")  # magic, version, precision, images, max batch, seed and data words,
#                                              weights' and images' SHA-256, length of the run's path


class CompressError(Exception):
    """Images that cannot be coded, a file that cannot be decoded, or a model the codec does not support."""


class BadImages(CompressError):
    """Images that are not a binary (N, 28, 28) array."""


def unsupported(run: TrainedVAE) -> str | None:
    """Why the codec cannot compress with this run, in one line naming the flag; None when it can.

    Asked of the run's own pieces, not of their names: the codec needs p(z) = N(0, I) (its bins have
    equal mass under it), q(z | x) = Normal(encoder's loc, scale) (run.encode then gives q) and Bernoulli
    pixels (run.decode then gives their probabilities).
    """
    vae, config = run.vae, run.config
    if len(vae.sites) != 1:
        return f"--layers {config.layers}: only one stochastic layer is coded (--layers 1)"
    if vae.conditional:
        return "--conditional: the label would need coding too; compress with an unconditional run"
    with torch.no_grad():
        prior = vae.prior()
        loc, scale = torch.zeros(2, config.latent_dim), torch.rand(2, config.latent_dim) + 0.5
        posterior = vae.posterior(loc, scale)
        likelihood = vae.likelihood(torch.zeros(1, *IMAGE_SHAPE))
    if not (_normal(prior) and torch.all(prior.mean == 0) and torch.all(prior.stddev == 1)):
        return f"--prior {config.prior}: the latent bins have equal mass under the standard normal (--prior normal)"
    if not (_normal(posterior) and torch.equal(posterior.mean, loc) and torch.equal(posterior.stddev, scale)):
        return f"--guide {config.guide}: the bits back need the encoder's diagonal Gaussian q(z | x) (--guide normal)"
    if not isinstance(getattr(likelihood, "base_dist", likelihood), dist.Bernoulli):
        return f"--likelihood {config.likelihood}: pixels are coded as binary (--likelihood bernoulli)"
    return None


def _normal(d) -> bool:
    """Whether d is a diagonal Normal (independent over the latent dimensions)."""
    return isinstance(d, dist.Independent) and type(d.base_dist) is dist.Normal


@dataclass(frozen=True)
class Header:
    """What a compressed file says about itself, before its ANS words."""

    run: str  # the run that encoded it, as given to decode by default
    weights_sha256: bytes  # of the model's state_dict: decoding refuses other weights
    images_sha256: bytes  # of the (N, 28, 28) uint8 images: decoding checks what it restores
    num_images: int
    precision: int  # 2^precision bins per latent dimension
    max_batch: int
    seed_words: int  # pseudo-random 32-bit words that seeded the stack
    data_words: int  # 32-bit ANS words after the header

    def pack(self) -> bytes:
        run = self.run.encode()
        return _HEADER.pack(MAGIC, VERSION, self.precision, self.num_images, self.max_batch, self.seed_words,
                            self.data_words, self.weights_sha256, self.images_sha256, len(run)) + run

    @property
    def size(self) -> int:
        """Bytes of the header."""
        return _HEADER.size + len(self.run.encode())


def read_header(data: bytes) -> Header:
    """The header of a compressed file; CompressError when data is not one, or is cut short."""
    if data[:len(MAGIC)] != MAGIC:
        raise CompressError("not a pyro_vae compressed file (no PVAEBB magic bytes at its start)")
    if len(data) < _HEADER.size:
        raise CompressError(f"truncated: {len(data)} bytes, shorter than the header")
    _, version, precision, n, max_batch, seed_words, data_words, weights, images, run_len = _HEADER.unpack_from(data)
    if version != VERSION:
        raise CompressError(f"format version {version}; this pyro_vae reads version {VERSION}")
    if len(data) < _HEADER.size + run_len:
        raise CompressError(f"truncated: {len(data)} bytes, shorter than the header")
    try:
        run = data[_HEADER.size:_HEADER.size + run_len].decode()
    except UnicodeDecodeError:
        raise CompressError("damaged header: the run's path is not text") from None
    header = Header(run, weights, images, n, precision, max_batch, seed_words, data_words)
    expected = header.size + 4 * data_words
    if len(data) < expected:
        raise CompressError(f"truncated: {len(data)} bytes, the header announces {expected}")
    if len(data) > expected or not (1 <= precision <= 20) or max_batch < 1 or n < 1:
        raise CompressError(f"damaged: {len(data)} bytes where the header announces {expected}, "
                            f"or settings out of range")
    return header


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


def weights_sha256(vae: torch.nn.Module) -> bytes:
    """SHA-256 of a model's state_dict (names, shapes, dtypes and values), the identity a file records."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        h.update(tensor.numpy().tobytes())
    return h.digest()


def batch_sizes(num_images: int, working_bits: int, max_batch: int) -> list[int]:
    """The batches, in coding order: from one image up to max_batch as the stack grows.

    Popping a batch's z with q(z | x) takes up to working_bits (precision x latent_dim) per image from the
    stack; the seed holds one image's worth, and each coded image adds at least ASSUMED_BITS_PER_IMAGE. The
    sizes depend on nothing but the numbers given, so the decoder computes the same batches.
    """
    sizes, done = [], 0
    while done < num_images:
        size = max(1, min(max_batch, (working_bits + done * ASSUMED_BITS_PER_IMAGE) // working_bits))
        sizes.append(min(size, num_images - done))
        done += sizes[-1]
    return sizes


def _seed_words(count: int) -> np.ndarray:
    """count pseudo-random 32-bit words, the same in every version of every library."""
    return np.frombuffer(hashlib.shake_256(SEED_TAG).digest(4 * count), dtype="<u4").astype(np.uint32)


@contextmanager
def _fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Codec:
    """The entropy models of one run at one precision: q(z | x) on the bins, p(x | z) at their centres, p(z)."""

    def __init__(self, run: TrainedVAE, precision: int):
        import constriction  # optional for the rest of the package

        model = constriction.stream.model
        self.run, self.latent_dim, bins = run, run.config.latent_dim, 1 << precision
        normal = NormalDist()
        # bin k is [edges[k], edges[k + 1]): prior mass 2^-precision each; its centre halves that mass
        edges = [-math.inf, *(normal.inv_cdf(k / bins) for k in range(1, bins)), math.inf]
        self.centres = torch.tensor([normal.inv_cdf((k + 0.5) / bins) for k in range(bins)], dtype=torch.float32)
        sqrt2 = math.sqrt(2.0)

        def cdf(x, loc, scale):  # constriction asks at x = k + 1/2: q's mass in bins 0..k, Phi((edge - loc) / scale)
            return 0.5 * math.erfc((loc - edges[min(max(int(x + 0.5), 0), bins)]) / (scale * sqrt2))

        def approximate_inverse_cdf(xi, loc, scale):  # only a starting point: constriction inverts cdf exactly
            xi = min(max(xi, 1e-300), 1 - 1e-16)
            return min(max(normal.cdf(loc + scale * normal.inv_cdf(xi)) * bins - 0.5, 0.0), bins - 1.0)

        self.posterior = model.CustomModel(cdf, approximate_inverse_cdf, 0, bins - 1)
        self.prior = model.Uniform(bins)
        self.pixels = model.Bernoulli(perfect=False)

    def q(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Loc and scale of q(z | x) for images (B, 28, 28), flattened to (B * latent_dim,) float64."""
        loc, scale = self.run.encode(torch.from_numpy(x).float().reshape(-1, *IMAGE_SHAPE))
        return loc.double().numpy().ravel(), scale.double().numpy().ravel()

    def p_x(self, bins: np.ndarray) -> np.ndarray:
        """The Bernoulli probabilities of p(x | z) at the centres of z's bins (B * latent_dim,): (B * 784,)."""
        z = self.centres[torch.from_numpy(bins.astype(np.int64))].reshape(-1, self.latent_dim)
        return self.run.decode(z).double().numpy().ravel()


def _load(run) -> tuple[TrainedVAE, str]:
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
    reason = unsupported(trained)
    if reason:
        raise CompressError(f"cannot compress with this run: {reason}")
    return trained, path


def _bar(total: int, desc: str, progress: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress is None else not progress)


def encode(run, images, *, precision: int = PRECISION, max_batch: int = MAX_BATCH,
           progress: bool | None = None) -> bytes:
    """Compress binary images (N, 28, 28) losslessly with a run (a path or a loaded run): the file's bytes."""
    images = check_images(images)
    if not 1 <= precision <= 20:
        raise CompressError(f"precision must be 1 to 20 bits, not {precision}")
    if max_batch < 1:
        raise CompressError(f"max_batch must be at least 1, not {max_batch}")
    return _encode(*_load(run), images, precision, max_batch, progress)


def _encode(trained: TrainedVAE, path: str, images: np.ndarray, precision: int, max_batch: int,
            progress: bool | None) -> bytes:
    import constriction

    codec = _Codec(trained, precision)
    working_bits = precision * codec.latent_dim
    seed_words = -(-working_bits // 32)
    coder = constriction.stream.stack.AnsCoder(_seed_words(seed_words), seal=True)
    start = 0
    with _fixed_threads(), _bar(len(images), "encode", progress) as bar:
        for size in batch_sizes(len(images), working_bits, max_batch):
            x = images[start:start + size]
            bins = coder.decode(codec.posterior, *codec.q(x))  # the bits back: z ~ q(z | x), drawn from the stack
            coder.encode_reverse(x.ravel().astype(np.int32), codec.pixels, codec.p_x(bins))
            coder.encode_reverse(bins, codec.prior)
            start += size
            bar.update(size)
    words = coder.get_compressed().astype("<u4")
    header = Header(path, weights_sha256(trained.vae), hashlib.sha256(images.tobytes()).digest(), len(images),
                    precision, max_batch, seed_words, len(words))
    return header.pack() + words.tobytes()


def decode(run, data: bytes, *, progress: bool | None = None) -> np.ndarray:
    """The images (N, 28, 28) uint8 that encode compressed into data; run None: the run data records."""
    import constriction

    header = read_header(data)
    try:
        trained, _ = _load(header.run if run is None else run)
    except CheckpointError as e:
        raise CompressError(f"encoded with the run {header.run}, which cannot be loaded here ({e}); "
                            "give its path (--run)") from e
    if weights_sha256(trained.vae) != header.weights_sha256:
        used = header.run if run is None else "the run given" if isinstance(run, TrainedVAE) else run
        raise CompressError(f"encoded with the run {header.run} (weights {header.weights_sha256.hex()[:12]}), but "
                            f"the weights of {used} differ ({weights_sha256(trained.vae).hex()[:12]})")
    codec = _Codec(trained, header.precision)
    words = np.frombuffer(data, dtype="<u4", offset=header.size).astype(np.uint32)
    images = np.empty((header.num_images, *IMAGE_SHAPE[1:]), dtype=np.uint8)
    sizes = batch_sizes(header.num_images, header.precision * codec.latent_dim, header.max_batch)
    end = header.num_images
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        with _fixed_threads(), _bar(header.num_images, "decode", progress) as bar:
            for size in reversed(sizes):  # a stack: the last batch coded comes off first
                bins = coder.decode(codec.prior, size * codec.latent_dim)
                pixels = coder.decode(codec.pixels, codec.p_x(bins)).astype(np.uint8).reshape(size, *IMAGE_SHAPE[1:])
                coder.encode_reverse(bins, codec.posterior, *codec.q(pixels))  # give the bits back
                images[end - size:end] = pixels
                end -= size
                bar.update(size)
        seed = coder.get_compressed(unseal=True)
    except (ValueError, RuntimeError, OverflowError, AssertionError) as e:  # constriction on words not its own
        raise CompressError(f"damaged: the coded words do not decode ({e})") from e
    if not np.array_equal(seed, _seed_words(header.seed_words)) or \
            hashlib.sha256(images.tobytes()).digest() != header.images_sha256:
        raise CompressError("the decoded images do not match the checksum the file records (damaged, or the "
                            "networks computed other probabilities here: another CPU or torch version?)")
    return images


# The command line


def elbo_bits(run: TrainedVAE, images: np.ndarray, batch_size: int = 500, seed: int = 0,
              progress: bool | None = None) -> np.ndarray:
    """-ELBO of each image in bits (single-sample, z drawn with this seed), the figure the code length matches."""
    from .evaluate import elbo_per_image

    x = torch.from_numpy(images).float().reshape(-1, *IMAGE_SHAPE)
    values = []
    with torch.random.fork_rng(devices=[]), _bar(len(x), "-ELBO", progress) as bar:
        torch.manual_seed(seed)
        for start in range(0, len(x), batch_size):
            values.append(elbo_per_image(run.vae, x[start:start + batch_size]))
            bar.update(len(values[-1]))
    return -torch.cat(values).double().numpy() / math.log(2)


def binarized_test_images(trained: TrainedVAE, limit: int = 0, data_dir: str | None = None) -> np.ndarray:
    """The run's first `limit` test images (0: all), binarized as evaluation binarizes them: uint8 (N, 28, 28)."""
    config = trained.config
    data = load_mnist(data_dir or config.data_dir, binarize=config.binarize, download=config.download,
                      test_size=config.test_size, split="test")
    images = data.test_images[:limit] if limit else data.test_images
    return images.reshape(-1, *IMAGE_SHAPE[1:]).to(torch.uint8).numpy()


def _read_images(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except OSError as e:
        raise BadImages(f"cannot read {path}: {e.strerror or e}") from e
    except (ValueError, EOFError) as e:
        raise BadImages(f"{path} is not a .npy array of numbers") from e


def _check_writable(path: Path) -> None:
    """Refuse before the work, not after it, a file that cannot be written."""
    if not path.parent.is_dir():
        raise CompressError(f"cannot write {path}: no directory {path.parent}")
    if path.is_dir():
        raise CompressError(f"cannot write {path}: it is a directory")


def _write_atomically(path: Path, write) -> None:
    """Write a file whole or not at all (checkpoint.write_atomically); a failure is a CompressError."""
    try:
        write_atomically(path, write)
    except OSError as e:
        raise CompressError(f"cannot write {path}: {e.strerror or e}") from e


def general_purpose_bits(images: np.ndarray) -> dict[str, int]:
    """Bits that gzip -9, bz2 -9 and lzma (xz -6) take for the same images, packed 8 pixels to a byte."""
    import bz2
    import gzip
    import lzma

    packed = np.packbits(images).tobytes()
    return {"gzip -9": 8 * len(gzip.compress(packed, 9, mtime=0)), "bz2 -9": 8 * len(bz2.compress(packed, 9)),
            "lzma": 8 * len(lzma.compress(packed))}


def report(data: bytes, minus_elbo_bits: np.ndarray, seconds: float, others: dict[str, int] | None = None) -> str:
    """The figures of a compressed file against the model's -ELBO (and other compressors) on the same images."""
    header = read_header(data)
    n, bits = header.num_images, 8 * len(data)
    elbo = minus_elbo_bits.sum()
    initial = 32 * (header.seed_words + 1)  # the seed words and the word constriction's seal adds
    overhead = f"{100 * (bits - elbo) / elbo:+.2f}%: header {8 * header.size} bits, initial bits {initial}"
    rows = [("bits-back ANS (file)", bits, ""), ("-ELBO (same images)", elbo, ""), ("overhead", bits - elbo, overhead),
            *((name, b, "same bits, packed") for name, b in (others or {}).items())]
    lines = [f"  {n} images in {len(data)} bytes, encoded in {seconds:.1f} s",
             f"  {'':22s} {'bits/image':>11s} {'bits/pixel':>11s}"]
    lines += [f"  {name:22s} {b / n:11.2f} {b / (n * PIXELS):11.4f}   {note}".rstrip() for name, b, note in rows]
    return "\n".join(lines)


def build_parser(prog: str = "python -m pyro_vae.compress") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} RUN FILE [--images IN.npy] [--limit N]\n"
              f"       {prog} --decode FILE OUT.npy [--run RUN]",
        description="Compress binary MNIST losslessly with bits-back ANS from a trained run's model and guide, "
                    "or (--decode) restore the images. By default the run's first N test images, binarized as "
                    "evaluation binarizes them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("paths", nargs=2, metavar="PATH", help="RUN FILE to encode; with --decode, FILE OUT.npy")
    parser.add_argument("--decode", action="store_true", help="restore the images of FILE into OUT.npy")
    parser.add_argument("--images", default=None, help="a .npy uint8 array (N, 28, 28) of 0 and 1 to encode")
    parser.add_argument("--limit", type=int, default=0, help="encode the first N test images (0: all)")
    parser.add_argument("--precision", type=int, default=PRECISION, help="2^P bins per latent dimension")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most images per network call")
    parser.add_argument("--data-dir", default=None, help="where MNIST is unpacked (default: the run's --data-dir)")
    parser.add_argument("--run", default=None, help="with --decode: the run to use instead of the one FILE records")
    return parser


def _encode_command(args) -> None:
    run, file = args.paths[0], Path(args.paths[1])
    _check_writable(file)
    images = check_images(_read_images(args.images)) if args.images else None
    trained, path = _load(run)
    if images is None:
        images = binarized_test_images(trained, args.limit, args.data_dir)
    started = time.perf_counter()
    data = _encode(trained, path, images, args.precision, args.max_batch, None)
    seconds = time.perf_counter() - started
    _write_atomically(file, lambda f: f.write(data))
    print(f"pyro_vae.compress: {run} -> {file}")
    print(report(data, elbo_bits(trained, images), seconds, general_purpose_bits(images)))


def _decode_command(args) -> None:
    started = time.perf_counter()
    file, out = Path(args.paths[0]), Path(args.paths[1])
    _check_writable(out)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CompressError(f"cannot read {file}: {e.strerror or e}") from e
    try:
        images = decode(args.run, data)
    except CompressError as e:
        raise CompressError(f"{file}: {e}") from e
    _write_atomically(out, lambda f: np.save(f, images))  # only images that passed the checksum
    print(f"pyro_vae.compress: restored {len(images)} images from {file} into {out} "
          f"in {time.perf_counter() - started:.1f} s")


def main(argv=None, prog: str = "python -m pyro_vae.compress") -> int:
    """The command line: exit 2 on bad flags or images, 1 on a file, run or model that cannot be used."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.decode and (args.images or args.limit):
        parser.error("--images and --limit are for encoding, not --decode")
    if not args.decode and args.run:
        parser.error("--run is for --decode; to encode, RUN is the first path")
    if args.images and args.limit:
        parser.error("--limit takes test images; with --images, give only the images to encode")
    for flag, value, low, high in (("--limit", args.limit, 0, None), ("--precision", args.precision, 1, 20),
                                   ("--max-batch", args.max_batch, 1, None)):
        if value < low or (high is not None and value > high):
            parser.error(f"{flag} must be {low} to {high}, not {value}" if high else
                         f"{flag} must be at least {low}, not {value}")
    try:
        (_decode_command if args.decode else _encode_command)(args)
    except KeyboardInterrupt:
        print("\npyro_vae.compress: interrupted; nothing written", file=sys.stderr)
        return 130
    except BadImages as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CompressError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
