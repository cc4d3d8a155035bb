"""`pyro-vae COMMAND ...`: one command whose subcommands are the modules' own command lines.

`pyro-vae train ...` is `python -m pyro_vae.train ...`, flag for flag and exit code for exit code: each
subcommand hands the rest of the line to its module's `main(argv, prog)`, imported only when chosen.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {  # subcommand -> (module, what it does)
    "train": ("pyro_vae.train", "train a VAE, or --resume an interrupted run"),
    "evaluate": ("pyro_vae.evaluate", "test ELBO, importance-sampled log p(x), KL and active units of a run"),
    "plot": ("pyro_vae.plot", "save a run's pictures into RUN/plots/"),
    "compress": ("pyro_vae.compress", "compress binary MNIST losslessly with bits-back ANS, or --decode"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-vae", description="A variational autoencoder on MNIST written as a Pyro model and guide.",
        epilog="`pyro-vae COMMAND --help` lists the flags of one command; `pyro-vae train ...` is "
               "`python -m pyro_vae.train ...`, and so on.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)  # its own --help is the module's
    return parser


def main(argv=None) -> int:
    """Dispatch to a subcommand's main; a missing or unknown subcommand exits 2 with the list."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = build_parser().parse_args(argv[:1]).command  # only the first word: the rest is the command's
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(argv[1:], prog=f"pyro-vae {command}")


if __name__ == "__main__":
    sys.exit(main())
