"""The CVAE bar of issue 43 on your own labelled images: train a CVAE (--conditional) on a class folder, train a
classifier on the same folder, and report the share of the CVAE's class-conditional samples that the classifier
calls the class they were asked for (bar: >= 0.90). docs/own_data.md gives the command and the figure.

    uv run python experiments/cvae_folder.py --folder digits --count 4000 --out runs/cvae_folder

The CVAE is the `cvae` row's (experiments/configs/cvae.toml): a fully connected network and 8 latent dimensions,
so that what class a digit is stays with the label rather than in z.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from digit_classifier import train_on  # noqa: E402
from make_digit_folder import write_digit_folder  # noqa: E402
from run import experiment  # noqa: E402

import pyro_vae  # noqa: E402
from pyro_vae import Config  # noqa: E402
from pyro_vae.datasets import load_images  # noqa: E402
from pyro_vae.train import train  # noqa: E402


RECIPE = experiment("cvae")["config"]  # the cvae row's: --conditional, mlp, 8 latent dimensions


def folder_recognition(folder: str | Path, out: str | Path, epochs: int = 200, classifier_epochs: int = 5,
                       per_class: int = 100, seed: int = 0, **config) -> dict:
    """Train a CVAE on the labelled folder through the trainer, a classifier on the same folder's training split,
    and classify per_class samples of each class; returns the figures (recognition is the bar's share).
    config: Config fields over RECIPE's."""
    config = {**RECIPE, **config}
    run_dir = train(Config(data=str(folder), epochs=epochs, out=str(out), seed=seed, **config), overwrite=True)
    run = pyro_vae.load(run_dir)
    data = load_images(folder, image_size=run.config.image_size, test_fraction=run.config.test_fraction,
                       binarize="none")
    net, accuracy = train_on(data, classifier_epochs, seed)
    torch.manual_seed(seed)
    classes = torch.arange(data.num_classes).repeat_interleave(per_class)
    with torch.no_grad():
        predicted = net(run.sample(len(classes), y=classes).cpu()).argmax(-1)
    return {"recognition": (predicted == classes).float().mean().item(), "classifier_test_accuracy": accuracy,
            "samples": len(classes), "train_images": data.num_train, "test_images": len(data.test_images),
            "run": str(run_dir)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="digits", help="a labelled image folder (written from MNIST if absent)")
    parser.add_argument("--count", type=int, default=3000, help="MNIST digits to write when --folder is absent")
    parser.add_argument("--epochs", type=int, default=200, help="a few thousand images need many epochs (2 min)")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--out", default="runs/cvae_folder")
    parser.add_argument("--latent-dim", type=int, default=RECIPE["latent_dim"],
                        help="the cvae row's 8 (32 leaves the class in z too)")
    parser.add_argument("--arch", choices=("mlp", "conv"), default=RECIPE["arch"],
                        help="the cvae row's fully connected networks")
    args = parser.parse_args(argv)
    if not Path(args.folder).exists():
        write_digit_folder(args.folder, args.count)
    figures = folder_recognition(args.folder, args.out, args.epochs, per_class=args.per_class,
                                 latent_dim=args.latent_dim, arch=args.arch)
    print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return 0 if figures["recognition"] >= 0.90 else 1


if __name__ == "__main__":
    sys.exit(main())
