"""The codec's command line (`python -m pyro_vae.compress`, `pyro-vae compress`): a thin shell over encode and
decode, with the figures it prints (report) and the test images it codes by default."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import compress as codec  # the package: its functions are looked up when called (tests replace some)
from ..checkpoint import CheckpointError, write_atomically
from ..data import IMAGE_SHAPE, DataError, load_mnist
from ..trained import TrainedVAE
from . import (BASE_SPACE_WIDEN, DEFAULT_K, DEFAULT_WIDEN, MAX_BATCH, PIXELS, PRECISION, BadImages, CompressError, _bar,
               check_images, read_header, setting_problems)

def elbo_bits(run: TrainedVAE, images: np.ndarray, labels: np.ndarray | None = None, batch_size: int = 500,
              seed: int = 0, progress: bool | None = None) -> np.ndarray:
    """-ELBO of each image in bits (single-sample, z drawn with this seed); with labels, of image and label."""
    from ..evaluate import elbo_per_image

    x = torch.from_numpy(images).float().reshape(-1, *IMAGE_SHAPE)
    y = None if labels is None else torch.from_numpy(labels)
    values = []
    with torch.random.fork_rng(devices=[]), _bar(len(x), "-ELBO", progress) as bar:
        torch.manual_seed(seed)
        for start in range(0, len(x), batch_size):
            values.append(elbo_per_image(run.vae, x[start:start + batch_size],
                                         None if y is None else y[start:start + batch_size]))
            bar.update(len(values[-1]))
    return -torch.cat(values).double().numpy() / math.log(2)


def binarized_test_split(trained: TrainedVAE, limit: int = 0, data_dir: str | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The run's first `limit` test images (0: all), binarized as evaluation binarizes them: uint8 (N, 28, 28), and
    their labels (N,) int64."""
    config = trained.config
    data = load_mnist(data_dir or config.data_dir, binarize=config.binarize, download=config.download,
                      test_size=config.test_size, split="test")
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images.reshape(-1, *IMAGE_SHAPE[1:]).to(torch.uint8).numpy(), labels.to(torch.int64).numpy()


def binarized_test_images(trained: TrainedVAE, limit: int = 0, data_dir: str | None = None) -> np.ndarray:
    """The run's first `limit` test images (0: all), binarized as evaluation binarizes them: uint8 (N, 28, 28)."""
    return binarized_test_split(trained, limit, data_dir)[0]



def _read_array(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except OSError as e:
        raise BadImages(f"cannot read {path}: {e.strerror or e}") from e
    except (ValueError, EOFError) as e:
        raise BadImages(f"{path} is not a .npy array of {what}") from e


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


def labels_path(out: Path) -> Path:
    """Where --decode writes the labels of a labelled file: OUT.labels.npy beside OUT.npy."""
    return out.with_name(out.name.removesuffix(".npy") + ".labels.npy")


def general_purpose_bits(images: np.ndarray) -> dict[str, int]:
    """Bits that gzip -9, bz2 -9 and lzma (xz -6) take for the same images, packed 8 pixels to a byte."""
    import bz2
    import gzip
    import lzma

    packed = np.packbits(images).tobytes()
    return {"gzip -9": 8 * len(gzip.compress(packed, 9, mtime=0)), "bz2 -9": 8 * len(bz2.compress(packed, 9)),
            "lzma": 8 * len(lzma.compress(packed))}


def report(data: bytes, minus_elbo_bits: np.ndarray, seconds: float, others: dict[str, int] | None = None,
           bound_bits: np.ndarray | None = None) -> str:
    """The figures of a compressed file against the bound it coded at, the model's -ELBO (and other compressors)."""
    header = read_header(data)
    n, bits = header.num_images, 8 * len(data)
    elbo = minus_elbo_bits.sum()
    initial = 32 * (header.seed_words + 1)  # the seed words and the word constriction's seal adds
    overhead = f"{100 * (bits - elbo) / elbo:+.2f}%: header {8 * header.size} bits, initial bits {initial}"
    bound = [] if bound_bits is None else [
        (f"bound coded, K = {header.k}", bound_bits.sum(), "-log of each image's own estimate" if header.k > 1 else
         "log q - log p at each image's own draw")]
    rows = [("bits-back ANS (file)", bits, ""), *bound, ("-ELBO (same images)", elbo, ""),
            ("file - (-ELBO)", bits - elbo, overhead),
            *((name, b, "same bits, packed") for name, b in (others or {}).items())]
    lines = [f"  {n} images{' and labels' if header.labelled else ''} in {len(data)} bytes, K = {header.k}, "
             f"encoded in {seconds:.1f} s", f"  {'':26s} {'bits/image':>11s} {'bits/pixel':>11s}"]
    lines += [f"  {name:26s} {b / n:11.2f} {b / (n * PIXELS):11.4f}   {note}".rstrip() for name, b, note in rows]
    return "\n".join(lines)


def build_parser(prog: str = "python -m pyro_vae.compress") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} RUN FILE [--images IN.npy [--labels L.npy]] [--limit N] [--k K]\n"
              f"       {prog} --decode FILE OUT.npy [--run RUN]",
        description="Compress binary MNIST losslessly with bits-back ANS from a trained run's model and guide, "
                    "or (--decode) restore the images (and, for a label-conditioned run, their labels into "
                    "OUT.labels.npy). By default the run's first N test images (and labels), binarized as "
                    "evaluation binarizes them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("paths", nargs=2, metavar="PATH", help="RUN FILE to encode; with --decode, FILE OUT.npy")
    parser.add_argument("--decode", action="store_true", help="restore the images of FILE into OUT.npy")
    parser.add_argument("--images", default=None, help="a .npy uint8 array (N, 28, 28) of 0 and 1 to encode")
    parser.add_argument("--labels", default=None, help="with --images and a label-conditioned run: a .npy array "
                                                       "(N,) of their digits")
    parser.add_argument("--limit", type=int, default=0, help="encode the first N test images (0: all)")
    parser.add_argument("--k", type=int, default=None,
                        help=f"importance samples per image (default: {DEFAULT_K} for one layer, 1 for a hierarchy)")
    parser.add_argument("--widen", type=float, default=None,
                        help=f"with --k 2 or more: the draws' deviations over q's (default: {DEFAULT_WIDEN}; "
                             f"{BASE_SPACE_WIDEN} for a flow run's base-space proposal)")
    parser.add_argument("--precision", type=int, default=PRECISION, help="2^P bins per latent dimension")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most images per batch")
    parser.add_argument("--data-dir", default=None, help="where MNIST is unpacked (default: the run's --data-dir)")
    parser.add_argument("--run", default=None, help="with --decode: the run to use instead of the one FILE records")
    parser.add_argument("--device", default="cpu", help="with --decode: where the fixed-point coding networks "
                                                         "compute (cpu, cuda); a file written on a CPU decodes "
                                                         "exactly on a GPU")
    return parser


def _encode_command(args) -> None:
    run, file = args.paths[0], Path(args.paths[1])
    _check_writable(file)
    images = check_images(_read_array(args.images, "numbers")) if args.images else None
    labels = _read_array(args.labels, "digits") if args.labels else None
    trained, path = codec._load(run, args.k)
    if images is None:
        images, test_labels = binarized_test_split(trained, args.limit, args.data_dir)
        labels = test_labels if trained.vae.conditional else None
    labels = codec._labels_for(trained, labels, len(images))
    started = time.perf_counter()
    data, bound = codec._encode(trained, path, images, labels, k=args.k, widen=args.widen, precision=args.precision,
                          max_batch=args.max_batch)
    seconds = time.perf_counter() - started
    _write_atomically(file, lambda f: f.write(data))
    print(f"pyro_vae.compress: {run} -> {file}")
    print(report(data, elbo_bits(trained, images, labels), seconds, general_purpose_bits(images), bound))


def _decode_command(args) -> None:
    started = time.perf_counter()
    file, out = Path(args.paths[0]), Path(args.paths[1])
    _check_writable(out)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CompressError(f"cannot read {file}: {e.strerror or e}") from e
    try:
        images, labels = codec.decode(args.run, data, labels=True, device=args.device)
    except CompressError as e:
        raise CompressError(f"{file}: {e}") from e
    # only images that passed the checksum; the labels first, so that OUT.npy exists only beside its labels
    if labels is not None:
        _write_atomically(labels_path(out), lambda f: np.save(f, labels))
    _write_atomically(out, lambda f: np.save(f, images))
    print(f"pyro_vae.compress: restored {len(images)} images{' and labels' if labels is not None else ''} from "
          f"{file} into {out}{f' and {labels_path(out)}' if labels is not None else ''} "
          f"in {time.perf_counter() - started:.1f} s")


def main(argv=None, prog: str = "python -m pyro_vae.compress") -> int:
    """The command line: exit 2 on bad flags or images, 1 on a file, run or model that cannot be used."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.decode and (args.images or args.labels or args.limit or args.k is not None or args.widen is not None):
        parser.error("--images, --labels, --limit, --k and --widen are for encoding, not --decode")
    if not args.decode and (args.run or args.device != "cpu"):
        parser.error("--run and --device are for --decode; to encode, RUN is the first path (on the CPU)")
    if args.images and args.limit:
        parser.error("--limit takes test images; with --images, give only the images to encode")
    if args.labels and not args.images:
        parser.error("--labels goes with --images (test images come with their own labels)")
    if args.limit < 0:
        parser.error(f"--limit must be at least 0, not {args.limit}")
    problems = setting_problems(args.k, args.widen, args.precision, args.max_batch)
    if problems:
        parser.error(problems[0])
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


