"""The one command (`pyro-vae train|evaluate|plot|compress`, the console script) and the trainer's config files."""

import json
import sys
import tomllib
from pathlib import Path

import pytest

import processes
from pyro_vae import cli
from pyro_vae.config import Config, parse_command_line
from pyro_vae.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.toml"))
PYRO_VAE = Path(sys.executable).parent / "pyro-vae"  # the console script that `uv sync` installs beside python


def _run(*argv, cwd=ROOT):
    return processes.run([str(a) for a in argv], cwd=cwd, timeout=300)


def _error_line(stderr: str) -> str:
    """The last line of a usage error, less its "PROG: error: " prefix."""
    return stderr.strip().splitlines()[-1].split(": error: ", 1)[1]


def test_each_subcommand_is_its_modules_main_with_the_same_exit_code(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--latent-dim", "0"])
    assert info.value.code == 2
    assert "pyro-vae train: error: --latent-dim must be at least 1, not 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train_main(["--latent-dim", "0"])
    assert info.value.code == 2
    assert "python -m pyro_vae.train: error: --latent-dim must be at least 1, not 0" in capsys.readouterr().err
    assert cli.main(["evaluate", "/no/such/run"]) == 1
    assert capsys.readouterr().err == "error: no checkpoint at /no/such/run\n"
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: pyro-vae {command} ")


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--latent-dim", "4"]], ids=["none", "unknown", "a-flag-first"])
def test_a_missing_or_unknown_subcommand_exits_2_listing_them(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("usage: pyro-vae ") and "pyro-vae: error: " in err


@pytest.mark.slow
def test_the_console_script_lists_its_subcommands_and_passes_on_flags_and_exit_codes(tmp_path):
    assert PYRO_VAE.is_file(), "the pyro-vae console script is missing: run `uv sync`"
    top = _run(PYRO_VAE, "--help")
    assert top.returncode == 0 and all(f"    {command} " in top.stdout for command in cli.COMMANDS), top.stdout
    trainer = _run(PYRO_VAE, "train", "--help")
    assert trainer.returncode == 0 and trainer.stdout.startswith("usage: pyro-vae train ")
    assert all(flag in trainer.stdout for flag in ("--latent-dim", "--config", "--resume", "--tensorboard"))
    # a bad flag: exit 2 and the same one line as `python -m pyro_vae.train`, no traceback
    bad = _run(PYRO_VAE, "train", "--epochs", "-3", "--out", tmp_path / "run")
    module = _run(sys.executable, "-m", "pyro_vae.train", "--epochs", "-3", "--out", tmp_path / "run")
    assert bad.returncode == module.returncode == 2 and "Traceback" not in bad.stderr
    assert _error_line(bad.stderr) == _error_line(module.stderr) == "--epochs must be at least 1, not -3"
    assert not (tmp_path / "run").exists()
    unknown = _run(PYRO_VAE, "trian")
    assert unknown.returncode == 2 and "invalid choice: 'trian'" in unknown.stderr


@pytest.mark.slow
def test_the_console_script_trains_from_a_config_file_then_evaluates_and_compresses(data_dir, tmp_path):
    """The path a user runs: train with a config file and an override, then evaluate and compress the run."""
    settings = tmp_path / "tiny.toml"
    settings.write_text(f'description = "a smoke run"\n[config]\nlatent_dim = 3\nconv_channels = [8, 16]\n'
                        f'max_steps = 2\nbatch_size = 32\ntrain_size = 256\ntest_size = 64\ndevice = "cpu"\n'
                        f'data_dir = "{data_dir}"\n[full]\nepochs = 100\n')
    run = tmp_path / "run"
    trained = _run(PYRO_VAE, "train", "--config", settings, "--latent-dim", "2", "--out", run)
    assert trained.returncode == 0, trained.stderr
    saved = json.loads((run / "config.json").read_text())
    assert (saved["latent_dim"], saved["conv_channels"], saved["max_steps"]) == (2, [8, 16], 2)  # the flag won
    assert saved["epochs"] == Config().epochs  # [full] is the experiment runner's, not read
    evaluated = _run(PYRO_VAE, "evaluate", run, "--k", "2", "--limit", "16", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((run / "evaluation.json").read_text())["num_images"] == 16
    encoded = _run(PYRO_VAE, "compress", run, tmp_path / "digits.vae", "--limit", "4")
    assert encoded.returncode == 0, encoded.stderr
    decoded = _run(PYRO_VAE, "compress", "--decode", tmp_path / "digits.vae", tmp_path / "digits.npy")
    assert decoded.returncode == 0 and (tmp_path / "digits.npy").is_file(), decoded.stderr


def _toml(tmp_path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def test_a_config_file_sets_the_fields_and_flags_override_it(tmp_path):
    path = _toml(tmp_path, 'description = "mine"\n[config]\nlatent_dim = 8\nbinarize = "threshold"\nepochs = 3\n'
                           'conv_channels = [8, 16]\nlr = 1\nconditional = true\ncuda_graph = false\n'
                           '[short]\nepochs = 1\n[full]\nepochs = 100\n')
    config, options = parse_command_line(["--config", str(path), "--device", "cpu"])
    assert (config.latent_dim, config.binarize, config.epochs, config.conv_channels) == (8, "threshold", 3, (8, 16))
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.conditional and not config.cuda_graph
    assert config.batch_size == Config().batch_size  # what the file leaves out keeps its default
    assert vars(options) == {"resume": None, "overwrite": False, "stop_after": 0, "tensorboard": False}
    overridden, _ = parse_command_line(["--latent-dim", "4", "--config", str(path), "--no-conditional",
                                        "--conv-channels", "4", "4", "--device", "cpu"])
    assert (overridden.latent_dim, overridden.conditional, overridden.conv_channels) == (4, False, (4, 4))
    assert (overridden.binarize, overridden.epochs) == ("threshold", 3)  # the rest still from the file


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_experiment_file_is_a_config_file(path):
    """experiments/configs/*.toml: their [config] tables are what the trainer reads; [short]/[full] are not."""
    config, _ = parse_command_line(["--config", str(path), "--device", "cpu"])
    table = tomllib.loads(path.read_text())["config"]
    expected = Config.from_dict({**Config(device="cpu").to_dict(), **table})
    assert config == expected
    assert config.epochs == table.get("epochs", Config().epochs)


@pytest.mark.parametrize("text, message", [
    ("[config]\nlatnt_dim = 4\n", "unknown key 'latnt_dim' in [config]"),
    ("latent_dim = 4\n", "unknown key 'latent_dim' at the top level (Config fields go in the [config] table)"),
    ("[medium]\nepochs = 4\n", "unknown key 'medium' at the top level"),
    ("[config]\nlatent_dim = \"four\"\n", "latent_dim must be an integer, not 'four'"),
    ("[config]\nlatent_dim = 4.0\n", "latent_dim must be an integer, not 4.0"),
    ("[config]\nlatent_dim = 0\n", "latent_dim must be at least 1, not 0"),
    ("[config]\nlr = nan\n", "lr must be a finite number, not nan"),
    ("[config]\nprior = \"gaussian\"\n", "prior must be one of normal, laplace"),
    ("[config]\nconv_channels = [8]\n", "conv_channels must be a list of 2 integers, not [8]"),
    ("[config]\nupper_dims = [8, 1.5]\n", "upper_dims must be a list of integers, not [8, 1.5]"),
    ("[config]\nconditional = 1\n", "conditional must be true or false, not 1"),
    ("[config\n", "not a TOML file: "),
], ids=["unknown", "top-level", "table", "string", "float-for-int", "range", "nan", "choice", "length", "list",
        "bool", "syntax"])
def test_a_bad_config_file_is_exit_2_with_one_line_naming_the_key(text, message, tmp_path, capsys):
    path = _toml(tmp_path, text)
    with pytest.raises(SystemExit) as info:
        train_main(["--config", str(path), "--data-dir", str(tmp_path / "nothing-here")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert _error_line(err).startswith(f"--config {path}: {message}"), err
    assert not (tmp_path / "nothing-here").exists()  # refused before any data is read


def test_a_missing_config_file_and_a_resume_with_one_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--config", str(tmp_path / "none.toml")])
    assert info.value.code == 2 and "cannot read it: No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a resumed run takes its saved config, and no other
        train_main(["--resume", str(tmp_path), "--config", str(_toml(tmp_path, "[config]\nepochs = 2\n"))])
    assert info.value.code == 2 and "drop --config" in capsys.readouterr().err


def test_a_config_file_that_is_not_utf8_or_nested_too_deep_is_one_line_naming_it(tmp_path, capsys):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[config]\n# r\u00e9glages\nepochs = 2\n".encode("latin-1"))
    deep = _toml(tmp_path, "a = " + "[" * 5000 + "]" * 5000 + "\n")
    for path, message in [(latin1, "not UTF-8 text (byte 12 is 0xe9); a TOML file is UTF-8"),
                          (deep, "nested too deeply to read")]:
        with pytest.raises(SystemExit) as info:
            train_main(["--config", str(path)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        assert _error_line(err).startswith(f"--config {path}: {message}"), err


def test_a_pixelcnn_kernel_wider_than_the_images_is_refused_when_the_flags_are_read(tmp_path, capsys):
    for side_flags, side in [([], 28), (["--data", str(tmp_path / "any.npy"), "--image-size", "16"], 16)]:
        with pytest.raises(SystemExit) as info:
            parse_command_line(["--likelihood", "pixelcnn", "--pixelcnn-kernel", str(side + 1), *side_flags])
        assert info.value.code == 2
        assert _error_line(capsys.readouterr().err).startswith(
            f"--pixelcnn-kernel {side + 1} is wider than the images ({side} pixels a side)")
    config, _ = parse_command_line(["--likelihood", "pixelcnn", "--pixelcnn-kernel", "27"])
    assert config.pixelcnn_kernel == 27
