"""The one Config dataclass, and the command line that fills it (one flag per field)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import IMAGE_SHAPE, MNIST_TEST, MNIST_TRAIN, NUM_CLASSES


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu: the default --device of every command."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pieces(kind: str) -> dict:
    """The registry of one kind of piece of the model or guide ("prior", "likelihood", "guide"): name -> class."""
    from .guides import GUIDES
    from .likelihoods import LIKELIHOODS
    from .priors import PRIORS

    return {"prior": PRIORS, "likelihood": LIKELIHOODS, "guide": GUIDES}[kind]


def _opt(default, help: str, *, choices=None, minimum=None, maximum=None, nargs=None, registry=None):
    """A dataclass field that also describes its CLI flag and its allowed range.

    registry: the kind of piece (see `pieces`) whose registry's names are the choices, read when asked,
    so a piece added to a registry is a choice of the flag without an edit here.
    """
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum, "nargs": nargs, "registry": registry}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every hyperparameter of a run; saved in the run directory and in each checkpoint."""

    # optimisation
    epochs: int = _opt(15, "passes over the training set", minimum=1)
    batch_size: int = _opt(128, "images per SVI step", minimum=1)
    lr: float = _opt(1e-3, "Adam learning rate", minimum=0.0)
    num_particles: int = _opt(1, "samples of z per image in the ELBO estimate", minimum=1)
    max_steps: int = _opt(0, "stop after this many SVI steps in all (0: no cap; for smoke runs)", minimum=0)
    seed: int = _opt(0, "seed for every random number generator", minimum=0)
    init_from: str = _opt("", "begin from another run's weights (its folder, pretrained/NAME or a shipped run's NAME) "
                              "with a fresh optimizer: fine-tuning; the model must have the same shapes")
    # architecture
    latent_dim: int = _opt(32, "size of the latent z", minimum=1)
    arch: str = _opt("conv", "encoder/decoder networks", choices=("conv", "mlp"))
    conv_channels: tuple = _opt((32, 64), "channels of the two stride-2 conv layers", minimum=1, nargs=2)
    hidden_dim: int = _opt(400, "hidden units of the mlp networks", minimum=1)
    layers: int = _opt(1, "stochastic layers: p(z_L) p(z_L-1 | z_L) ... p(z_1 | z_2) p(x | z_1); z_1 is the latent z",
                       minimum=1)
    upper_dims: tuple = _opt((), "with --layers L >= 2: widths of z_2 .. z_L, one value per layer or one for all "
                                 "(default: --latent-dim)", minimum=1, nargs="+")
    layer_hidden_dim: int = _opt(256, "with --layers 2 or more: hidden units of each network between two layers",
                                 minimum=1)
    init: str = _opt("torch", "initial weights of the networks: torch's defaults, or glorot (Keras's defaults: "
                              "Glorot-uniform weights, zero biases)", choices=("torch", "glorot"))
    # the generative story and the posterior family
    prior: str = _opt("normal", "p(z), a class in priors.PRIORS", registry="prior")
    prior_components: int = _opt(10, "mixture components of the mog prior, pseudo-inputs of the vamp prior",
                                 minimum=1)
    studentt_df: float = _opt(3.0, "degrees of freedom of the studentt prior (fewer: heavier tails)")
    likelihood: str = _opt("bernoulli", "p(x | z), a class in likelihoods.LIKELIHOODS; each says which --binarize "
                                        "data it fits", registry="likelihood")
    pixelcnn_channels: int = _opt(16, "with --likelihood pixelcnn: channels of its masked convolutions and of the "
                                      "decoder's feature map of z", minimum=1)
    pixelcnn_layers: int = _opt(3, "with --likelihood pixelcnn: residual masked convolutions after the first",
                                minimum=0)
    logistic_components: int = _opt(10, "with --likelihood logistic-mixture: logistics in each pixel's mixture",
                                    minimum=1)
    pixelcnn_kernel: int = _opt(3, "with --likelihood pixelcnn: kernel size of its masked convolutions (odd); "
                                   "each pixel sees (layers + 1) * (kernel // 2) rows above and columns either side",
                                minimum=3)
    pixelcnn_gated: bool = _opt(False, "with --likelihood pixelcnn: gated residual layers, tanh(a) * sigmoid(b) of a "
                                       "masked convolution to twice the channels (van den Oord et al. 2016's "
                                       "conditional PixelCNN), in place of relu")
    guide: str = _opt("normal", "q(z | x), the posterior family: a class in guides.GUIDES; with --layers 2 or more "
                                "the bottom-up q(z_1 | x) q(z_2 | z_1) ... (normal, iaf on z_1), or ladder: a "
                                "bottom-up pass merged top-down with p(z_l | z_l+1) (Sonderby et al. 2016)",
                      registry="guide")
    flow_steps: int = _opt(2, "steps of the iaf guide and of the flow prior", minimum=1)
    flow_hidden_factor: int = _opt(4, "hidden units of each step's network in the iaf guide and the flow prior, "
                                      "per latent dimension", minimum=1)
    conditional: bool = _opt(False, "label-conditioned CVAE: p(z | y) = Normal(mu_y, I), decoder and guide see y")
    class_prior: str = _opt("learned", "with --conditional: p(z | y) = Normal(mu_y, I) with a learned mean per digit, "
                                       "or standard: Normal(0, I) for every digit (Kingma et al.'s M2)",
                            choices=("learned", "standard"))
    label_at: str = _opt("head", "with --conditional: where the guide q(z | x, y) takes y in: the encoder's head, "
                                 "or input: its first layer (Kingma et al.'s M2)", choices=("head", "input"))
    labels: int = _opt(0, "with --conditional: use only this many training labels, semi-supervised (0: all)",
                       minimum=0)
    classifier_arch: str = _opt("", "semi-supervised: network of q(y | x), conv or mlp (default: the --arch of the "
                                    "encoder and decoder)", choices=("", "conv", "mlp"))
    classifier_weight: float = _opt(46.0, "semi-supervised: weight of log q(y | x) on labelled images", minimum=0.0)
    # the objective
    elbo: str = _opt("trace", "trace: Trace_ELBO; meanfield: analytic KL; iwae: importance-weighted bound",
                     choices=("trace", "meanfield", "iwae"))
    beta: float = _opt(1.0, "weight of the KL term (beta-VAE)", minimum=0.0)
    kl_warmup_epochs: float = _opt(0.0, "raise the KL weight linearly from 0 to --beta over this many epochs",
                                   minimum=0.0)
    free_bits: float = _opt(0.0, "free bits (Kingma et al. 2016), one group: nats per image under which a "
                                 "minibatch's KL term is not penalized, so the objective's KL term is "
                                 "max(FREE_BITS, KL) (0: off)", minimum=0.0)
    # data
    binarize: str = _opt("dynamic", "dynamic: fresh Bernoulli draw per use; threshold: pixel > 0.5; none: grey",
                         choices=("dynamic", "threshold", "none"))
    train_size: int = _opt(0, "use only the first N training images (0: all 60,000)", minimum=0)
    test_size: int = _opt(0, "use only the first N test images (0: all 10,000)", minimum=0)
    data_dir: str = _opt("~/.cache/pyro_vae", "where MNIST is unpacked (torchvision layout: DATA_DIR/MNIST/raw)")
    download: bool = _opt(False, "let torchvision download MNIST into --data-dir instead of using the shipped files")
    dataset: str = _opt("mnist", "which IDX data set: mnist (the shipped files), fashion-mnist or kmnist (their four "
                                 ".gz files in --data-dir, or --download)",
                        choices=("mnist", "fashion-mnist", "kmnist"))
    data: str = _opt("", "your own images instead of --dataset: a folder of images (class subfolders give labels) or "
                         "a .npy/.npz array; see docs/own_data.md")
    image_size: int = _opt(0, "with --data: resize every image to this side (0: keep the data's size)", minimum=0)
    test_fraction: float = _opt(0.1, "with --data: the share of the images held out as the test set (a fixed "
                                     "split)", minimum=0.0, maximum=0.9)
    image_shape: tuple = _opt((), "channels, height, width of the images: filled in from the data when training "
                                  "begins and saved in the checkpoint (given, it must match the data)", minimum=1,
                              nargs=3)
    num_classes: int = _opt(0, "classes of the labels: filled in from the data when training begins (0: from the "
                               "data; 1: unlabelled)", minimum=0)
    # where and how
    device: str = _opt(default_device, "torch device (default: cuda when available, else cpu)")
    out: str = _opt("", "run directory (default: runs/<date>-<time>)")
    eval_batch_size: int = _opt(1000, "images per batch when evaluating", minimum=1)
    cuda_graph: bool = _opt(True, "on CUDA, capture the training step in a CUDA graph after a few eager steps and "
                                  "replay it (--no-cuda-graph: every step eager; ignored on the CPU and under "
                                  "torchrun)")
    precision: str = _opt("fp32", "the networks' precision: bf16 (autocast; parameters, log-probs and the ELBO stay "
                                  "fp32), fp32, or auto: bf16 where the device runs it natively (a CPU with "
                                  "avx512_bf16 or amx_bf16, a GPU with bf16), else fp32; a run saves what auto chose",
                          choices=("auto", "bf16", "fp32"))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        kwargs = {k: tuple(v) if known[k].type == "tuple" else v for k, v in d.items()}
        return cls(**kwargs)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def describe(self) -> str:
        return "\n".join(f"  {k:16s} {v}" for k, v in self.to_dict().items())

    def shape(self) -> tuple:
        """(C, H, W) of the images; a config without one (before training, or an old checkpoint's) is MNIST's."""
        return tuple(self.image_shape) or IMAGE_SHAPE

    def classes(self) -> int:
        """The number of label classes; a config without one is MNIST's ten digits."""
        return self.num_classes or NUM_CLASSES

    def layer_dims(self) -> tuple:
        """Widths of z_1 .. z_L."""
        upper = self.upper_dims * (self.layers - 1) if len(self.upper_dims) == 1 else self.upper_dims
        return (self.latent_dim, *(upper or (self.latent_dim,) * (self.layers - 1)))

    def errors(self) -> list[str]:
        """Every problem with the values, each naming its flag; empty when the config is usable."""
        problems = [problem for f in dataclasses.fields(self)
                    for problem in _range_errors(f, getattr(self, f.name), _flag(f.name))]
        if self.pixelcnn_kernel % 2 == 0:
            problems.append(f"--pixelcnn-kernel must be odd (a masked kernel has a centre), not {self.pixelcnn_kernel}")
        problems += self.kernel_errors()
        if self.lr == 0:
            problems.append("--lr must be positive, not 0")
        if self.beta == 0:
            problems.append("--beta must be positive, not 0")
        if self.free_bits and self.elbo == "iwae":
            problems.append("--free-bits floors the ELBO's KL term, which the importance-weighted bound has not: "
                            "use it with --elbo trace or meanfield")
        if not self.studentt_df > 0:  # also refuses nan
            problems.append(f"--studentt-df must be positive, not {self.studentt_df}")
        problems += self._combination_errors()
        problems += self._data_errors()
        train_n = self.train_size or MNIST_TRAIN
        if self.batch_size > train_n and not self.data:  # your own data's size is checked when it is read
            problems.append(f"--batch-size must be at most the number of training images ({train_n}), "
                            f"not {self.batch_size}")
        world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
        if self.batch_size % world:
            problems.append(f"--batch-size is the global batch and must divide evenly among the {world} "
                            f"torchrun processes, not {self.batch_size}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            problems.append(f"--device must be cpu or cuda[:N], not {self.device!r}")
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(f"--device {self.device} was asked for, but this machine has no CUDA device; "
                            "use --device cpu")
        return problems


    def kernel_errors(self) -> list[str]:
        """A PixelCNN kernel wider than the images, where their side is known: before the data is read that is
        the MNIST family's 28 or --image-size; your own images' side once fill_config has written their shape."""
        if self.likelihood != "pixelcnn":
            return []
        side = min(self.image_shape[1:]) if self.image_shape else self.image_size if self.data else IMAGE_SHAPE[1]
        if side and self.pixelcnn_kernel > side:
            return [f"--pixelcnn-kernel {self.pixelcnn_kernel} is wider than the images ({side} pixels a side): "
                    f"give an odd kernel of at most {side - 1 + side % 2}"]
        return []

    def _data_errors(self) -> list[str]:
        """The data flags that go together; the MNIST-family data sets' split sizes."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.data:
            return [f"--data and --dataset {self.dataset} are two sources of images: give one"] \
                if self.dataset != defaults["dataset"] else []
        problems = [f"{_flag(name)} needs --data (your own images); --dataset {self.dataset} has its own split"
                    for name in ("image_size", "test_fraction") if getattr(self, name) != defaults[name]]
        for name in ("train_size", "test_size"):
            limit = {"train_size": MNIST_TRAIN, "test_size": MNIST_TEST}[name]
            if getattr(self, name) > limit:
                problems.append(f"{_flag(name)} must be at most {limit}, not {getattr(self, name)}")
        return problems

    def _combination_errors(self) -> list[str]:
        """What the chosen pieces (prior, likelihood, guide) say they need, and the flags that go together."""
        problems = []
        chosen = {kind: pieces(kind).get(getattr(self, kind)) for kind in ("prior", "likelihood", "guide")}
        fits = chosen["likelihood"].fits if chosen["likelihood"] else ()
        problems += self._settings_errors(chosen)
        if self.binarize in ("dynamic", "threshold", "none") and fits and self.binarize not in fits:
            kind = "grey-valued" if "none" in fits else "binary"
            problems.append(f"--likelihood {self.likelihood} models {kind} pixels: use it with --binarize "
                            f"{' or '.join(fits)}, not --binarize {self.binarize}")
        if self.conditional and chosen["prior"]:  # the model then uses the prior's label-conditioned form
            if chosen["prior"].label_conditional is None:
                problems.append("--conditional has its own prior p(z | y), the label-conditioned form of --prior "
                                f"{_names('prior', 'label_conditional')}: use that, not --prior {self.prior}")
            chosen["prior"] = chosen["prior"].label_conditional
        for kind in ("prior", "guide"):
            piece = chosen[kind]
            if piece and self.latent_dim < piece.min_latent_dim:
                problems.append(f"--{kind} {getattr(self, kind)} needs --latent-dim {piece.min_latent_dim} or more, "
                                f"not {self.latent_dim}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in ("labels", "class_prior", "label_at"):
            if getattr(self, name) != defaults[name] and not self.conditional:
                problems.append(f"{_flag(name)} needs --conditional (the label-conditioned model)")
        if self.classifier_arch and not self.labels:
            problems.append("--classifier-arch is the network of q(y | x), which only the semi-supervised model "
                            "has: use it with --conditional --labels N")
        if self.labels and self.labels < 10:
            problems.append(f"--labels must be at least 10 (one per digit), not {self.labels}")
        if self.labels > (self.train_size or MNIST_TRAIN):
            problems.append(f"--labels must be at most the number of training images, not {self.labels}")
        if self.elbo == "meanfield" and not all(piece and piece.analytic_kl
                                                 for piece in (chosen["prior"], chosen["guide"])):
            problems.append("--elbo meanfield uses the analytic KL, which exists here only for --guide "
                            f"{_names('guide', 'analytic_kl')} with --prior {_names('prior', 'analytic_kl')}, "
                            f"not --guide {self.guide} --prior {self.prior}")
        if self.elbo == "iwae" and self.num_particles < 2:
            problems.append("--elbo iwae needs --num-particles 2 or more (with 1 it is the ordinary ELBO)")
        if self.labels and self.elbo != "trace":
            problems.append(f"--labels (semi-supervised) sums over unknown labels with TraceEnum_ELBO: "
                            f"use --elbo trace, not --elbo {self.elbo}")
        return problems + self._hierarchy_errors()

    def _settings_errors(self, chosen: dict) -> list[str]:
        """A field that only one piece reads (its `settings`), given while another piece is chosen."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        problems = []
        for kind in ("prior", "likelihood", "guide"):
            for name, piece in pieces(kind).items():
                for setting in getattr(piece, "settings", ()):
                    if piece is not chosen[kind] and getattr(self, setting) != defaults[setting]:
                        problems.append(f"{_flag(setting)} is a setting of --{kind} {name}, not of --{kind} "
                                        f"{getattr(self, kind)}")
        return problems

    def _hierarchy_errors(self) -> list[str]:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.layers == 1:
            needs = [_flag(name) for name in ("upper_dims", "layer_hidden_dim")
                     if getattr(self, name) != defaults[name]] + (["--guide ladder"] if self.guide == "ladder" else [])
            return [f"{flag} needs --layers 2 or more" for flag in needs]
        problems = []
        if len(self.upper_dims) not in (0, 1, self.layers - 1):
            problems.append(f"--upper-dims takes one width for all of z_2 .. z_L or one per layer ({self.layers - 1}), "
                            f"not {len(self.upper_dims)}")
        elif self.prior == "flow" and self.layer_dims()[-1] < 2:
            problems.append("--prior flow is the top layer's prior: it needs a top width (--upper-dims) of 2 or more")
        reasons = {
            "delta": "--guide delta is a point z, and a point z_1 under p(z_1 | z_2) is a density at a point, no bound",
            "conditional": "--conditional's label enters p(z | y) of the one-layer model; no place for it is chosen "
                           "in a hierarchy",
            "meanfield": "--elbo meanfield's analytic KL needs a guide whose latents are independent, and q(z_2 | z_1) "
                         "is not",
            "vamp": "--prior vamp mixes q(z_L | u_k) at pseudo-inputs u_k, which only the ladder guide has in closed "
                    "form (the bottom-up guide reaches z_L through z_1): use --guide ladder",
        }
        given = {"delta": self.guide == "delta", "conditional": self.conditional, "meanfield": self.elbo == "meanfield",
                 "vamp": self.prior == "vamp" and self.guide != "ladder"}
        problems += [f"{reasons[name]}: not with --layers {self.layers}" for name, bad in given.items() if bad]
        return problems


def _range_errors(f: dataclasses.Field, value, name: str) -> list[str]:
    """What is wrong with one field's value on its own (choices, range, finite), each naming it as `name`."""
    meta, choices, problems = f.metadata, _choices(f), []
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, float) and not math.isfinite(v):  # nan passes every comparison below
            problems.append(f"{name} must be a finite number, not {v}")
            continue
        if choices and v not in choices:
            problems.append(f"{name} must be one of {', '.join(choices)}, not {v!r}")
        if meta.get("min") is not None and v < meta["min"]:
            problems.append(f"{name} must be at least {meta['min']}, not {v}")
        if meta.get("max") is not None and v > meta["max"]:
            problems.append(f"{name} must be at most {meta['max']}, not {v}")
    return problems


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a field: its registry's names, read now, or its fixed choices."""
    if f.metadata.get("registry"):
        return tuple(pieces(f.metadata["registry"]))
    return f.metadata.get("choices")


def _names(kind: str, having: str) -> str:
    """The registry names of the pieces of one kind that declare `having`, e.g. "normal" or "normal or vamp"."""
    return " or ".join(name for name, piece in pieces(kind).items() if getattr(piece, having))


# A config file is an experiment's TOML file (experiments/configs/*.toml): Config fields under [config]. Its
# [short] and [full] tables are the lengths of experiments/run.py's two versions of the experiment, not read here
# (--epochs chooses the length), nor are its description and reference.
CONFIG_FILE_KEYS = {"config": dict, "short": dict, "full": dict, "description": str, "reference": str}
TOML_TYPES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
              "tuple": "a list of integers"}


def read_config_file(path: str | Path) -> dict:
    """The [config] table of a TOML config file, as field -> value; ValueError naming the key of a bad one."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not a TOML file: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                         "a TOML file is UTF-8") from e
    except RecursionError as e:
        raise ValueError(f"--config {path}: nested too deeply to read (a TOML config is a flat [config] "
                         "table)") from e
    for key, value in document.items():
        if key not in CONFIG_FILE_KEYS:
            where = " (Config fields go in the [config] table)" if key in _fields() else ""
            raise ValueError(f"--config {path}: unknown key {key!r} at the top level{where}; the file may hold "
                             f"{', '.join(CONFIG_FILE_KEYS)}")
        kind = CONFIG_FILE_KEYS[key]
        if not isinstance(value, kind):
            raise ValueError(f"--config {path}: {key} must be a {'table' if kind is dict else 'string'}")
    values = {}
    for key, value in document.get("config", {}).items():
        f = _fields().get(key)
        if f is None:
            raise ValueError(f"--config {path}: unknown key {key!r} in [config]: not a Config field")
        value = _from_toml(f, value)
        if value is None:
            count = f.metadata.get("nargs")
            kind = f"a list of {count} integers" if isinstance(count, int) else TOML_TYPES[f.type]
            raise ValueError(f"--config {path}: {key} must be {kind}, not {document['config'][key]!r}")
        problems = _range_errors(f, value, key)
        if problems:
            raise ValueError(f"--config {path}: {problems[0]}")
        values[key] = value
    return values


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _from_toml(f: dataclasses.Field, value):
    """A TOML value as the field's type (an integer is a float too), or None where it is of another type."""
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if f.type == "int":
        return value if integer(value) else None
    if f.type == "float":
        return float(value) if integer(value) or isinstance(value, float) else None
    if f.type == "str":
        return value if isinstance(value, str) else None
    if f.type == "bool":
        return value if isinstance(value, bool) else None
    nargs = f.metadata.get("nargs")  # 2: exactly two values; "+": any number
    fits = isinstance(value, list) and (not isinstance(nargs, int) or len(value) == nargs)
    return tuple(value) if fits and all(integer(v) for v in value) else None


def build_parser(prog: str = "python -m pyro_vae.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a variational autoencoder on MNIST with Pyro's SVI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config()
    for f in dataclasses.fields(Config):
        meta, default = f.metadata, getattr(defaults, f.name)
        if f.type == "bool":  # --x and --no-x, so a flag can undo a config file's value
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default,
                                help=meta["help"])
            continue
        kind = {"int": int, "float": float, "str": str, "tuple": int}[f.type]
        parser.add_argument(_flag(f.name), type=kind, default=default, help=meta["help"],
                            choices=_choices(f), nargs=meta.get("nargs"),
                            metavar=f.name.upper() if _choices(f) is None else None)
    return parser


# what to do with the run directory and this session: flags that are not hyperparameters
RUN_OPTIONS = ("resume", "overwrite", "stop_after", "tensorboard")


def parse_command_line(argv=None, prog: str = "python -m pyro_vae.train") -> tuple[Config, argparse.Namespace]:
    """Parse flags (and a --config file under them) into a checked Config and the run options; bad values exit
    with code 2 and a message."""
    parser = build_parser(prog)
    parser.add_argument("--config", metavar="FILE.toml",
                        help="read the [config] table of a TOML file (as experiments/configs/*.toml); flags given "
                             "here override its values")
    run = parser.add_argument_group("run directory")
    run.add_argument("--resume", metavar="RUN", help="continue the interrupted run in RUN with its saved config")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--stop-after", type=int, default=0, metavar="EPOCHS",
                     help="stop with a checkpoint after this many epochs of this session, to continue later with "
                          "--resume (0: train to the end)")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write each epoch's figures and pictures for TensorBoard into RUN/tensorboard (a "
                          "--resume of a run that has them continues them)")
    args = parser.parse_args(argv)
    if args.config and not args.resume:  # the file's values become the defaults, which the flags given override
        try:
            parser.set_defaults(**read_config_file(args.config))
        except ValueError as e:
            parser.error(str(e))
        args = parser.parse_args(argv)
    args = vars(args)
    if args["stop_after"] < 0:
        parser.error(f"--stop-after must be at least 0, not {args['stop_after']}")
    args.pop("config")
    options = argparse.Namespace(**{k: args.pop(k) for k in RUN_OPTIONS})
    if options.resume:
        given = sorted({a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])
                        if a.startswith("--")} - {"--resume", "--stop-after", "--tensorboard"})
        if given:
            parser.error(f"--resume continues a run with its saved config; drop {', '.join(given)}")
        return Config.from_dict(args), options
    config = Config.from_dict(args)
    problems = config.errors()
    if problems:
        parser.error("; ".join(problems))
    return config, options


def parse_args(argv=None) -> Config:
    """Parse command-line flags into a checked Config; bad values exit with code 2 and a message."""
    return parse_command_line(argv)[0]
