"""The README's commands are the package's: its set-up commands are CI's, each `pyro-vae` line parses with its
subcommand's own parser, and its quick start's Python block runs."""

import re
import shlex
from pathlib import Path

import pytest

from pyro_vae import cli
from pyro_vae.config import parse_command_line

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    """Every command of the README's bash blocks, comments dropped and `&&` chains split."""
    commands = []
    for language, block in BLOCKS:
        if language == "bash":
            for line in block.splitlines():
                for command in line.split("#")[0].split("&&"):
                    if command.strip():
                        commands.append(shlex.split(command))
    return commands


def test_the_two_set_up_commands_are_the_main_job_and_the_test_command_ci_runs():
    setup = [shlex.split(line.split("#")[0]) for line in BLOCKS[0][1].splitlines()]
    assert setup == [["uv", "run", "pyro-vae", "train"], ["uv", "run", "pytest"]]
    assert "uv run --locked pytest" in (ROOT / ".ci" / "run").read_text()
    assert len(README.split()) <= 1500  # a front page


@pytest.mark.parametrize("command", [c for c in _commands() if c[:3] == ["uv", "run", "pyro-vae"]],
                         ids=lambda c: " ".join(c[3:5]))
def test_each_pyro_vae_command_parses_with_its_subcommands_own_flags(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the checkout
    argv = command[3:]
    if argv == ["--help"]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        return
    name, args = argv[0], argv[1:]
    if name == "train":
        config, options = parse_command_line(args)  # exits 2 on any flag the trainer does not take
        assert config.errors() == [] or options.resume
        return
    module = __import__(cli.COMMANDS[name][0], fromlist=["build_parser"])
    module.build_parser().parse_args(args)


def test_the_python_block_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    python = next(block for language, block in BLOCKS if language == "python")  # the quick start's
    namespace = {}
    exec(python, namespace)  # noqa: S102 - the README's own lines
    assert namespace["images"].shape == (16, 1, 28, 28) and namespace["loc"].shape == (16, 32)
