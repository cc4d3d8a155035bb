"""The layout shows the architecture: a variant is one class and one registry line (the CLI's choices and
refusals come from the pieces themselves), a loaded run's API lives in trained.py, the benchmark outside."""

import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import processes
import pyro_vae
from pyro_vae import checkpoint, priors, trained
from pyro_vae.config import Config, parse_command_line
from pyro_vae.model import build_vae
from pyro_vae.train import main


class WideNormal(priors.StandardNormal):
    """p(z) = Normal(0, 2^2 I): a prior that config.py has never heard of."""

    def forward(self, y=None) -> dist.Distribution:
        return dist.Normal(self.zero, 2.0).expand([self.latent_dim]).to_event(1)


class NeedsEightDims(priors.Laplace):
    """A prior that declares a constraint, as Flow does."""

    min_latent_dim = 8


def _argv(config: Config, *extra: str) -> list[str]:
    """The flags of small_config, for the command line."""
    return ["--epochs", "1", "--batch-size", str(config.batch_size), "--train-size", str(config.train_size),
            "--test-size", str(config.test_size), "--latent-dim", str(config.latent_dim),
            "--conv-channels", *map(str, config.conv_channels), "--data-dir", config.data_dir,
            "--out", config.out, "--device", "cpu", *extra]


def test_a_prior_added_to_PRIORS_is_chosen_by_the_cli_and_trains(monkeypatch, small_config):
    monkeypatch.setitem(priors.PRIORS, "wide", WideNormal)  # the one registry line; config.py is not touched
    config, _ = parse_command_line(_argv(small_config, "--prior", "wide"))
    assert config.prior == "wide" and config.errors() == []

    assert main(_argv(small_config, "--prior", "wide", "--max-steps", "3")) == 0
    run = pyro_vae.load(small_config.out)
    assert run.config.prior == "wide" and isinstance(run.vae.prior, WideNormal)
    x = torch.rand(5, 1, 28, 28).bernoulli()
    z = poutine.trace(run.vae.model).get_trace(x).nodes["z"]["fn"]  # the model draws z from the new prior
    assert torch.allclose(z.base_dist.scale, torch.tensor(2.0)) and z.event_shape == (small_config.latent_dim,)


def test_unknown_prior_is_refused_naming_the_registry_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["--prior", "wide"])
    assert exit_info.value.code == 2 and "--prior: invalid choice: 'wide'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--prior", "needs8", "--latent-dim", "4"], "--prior needs8 needs --latent-dim 8 or more, not 4"),
    (["--prior", "needs8", "--latent-dim", "8", "--elbo", "meanfield"],
     "--elbo meanfield uses the analytic KL, which exists here only for --guide normal with --prior normal or wide"),
    (["--prior", "needs8", "--latent-dim", "8", "--conditional"],
     "--conditional has its own prior p(z | y), the label-conditioned form of --prior normal or wide"),
])
def test_a_new_priors_declared_constraints_are_checked_by_config(flags, message, monkeypatch, capsys):
    monkeypatch.setitem(priors.PRIORS, "wide", WideNormal)  # inherits the normal's analytic KL and p(z | y)
    monkeypatch.setitem(priors.PRIORS, "needs8", NeedsEightDims)
    assert Config(prior="wide", elbo="meanfield", conditional=True, device="cpu").errors() == []
    assert Config(prior="needs8", latent_dim=8, device="cpu").errors() == []
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def _width(flow_steps: torch.nn.ModuleList) -> int:
    """Hidden units of the first step's network."""
    return flow_steps[0].nn.layers[0].out_features


def test_hidden_hyperparameters_are_config_fields_whose_defaults_keep_the_old_model():
    """Student-t df 3 and flow networks 4 x latent_dim wide, as before they were flags; the flags change them."""
    def vae(**fields):
        return build_vae(Config(latent_dim=6, device="cpu", **fields))

    assert (vae(prior="studentt").prior().base_dist.df == 3.0).all()
    assert _width(vae(prior="flow").prior.couplings) == _width(vae(guide="iaf").posterior.steps) == 4 * 6

    assert (vae(prior="studentt", studentt_df=7.5).prior().base_dist.df == 7.5).all()
    both = vae(prior="flow", guide="iaf", flow_hidden_factor=3)
    assert _width(both.prior.couplings) == _width(both.posterior.steps) == 3 * 6


def test_the_loaded_run_is_trained_py_and_the_package_has_no_hand_written_loss():
    assert pyro_vae.TrainedVAE is trained.TrainedVAE is checkpoint.TrainedVAE  # old imports keep working
    assert pyro_vae.load is checkpoint.load
    package = Path(pyro_vae.__file__).parent
    assert not (package / "bench.py").exists() and (package.parent / "benchmarks" / "bench.py").is_file()
    assert not any("binary_cross_entropy" in f.read_text() for f in package.glob("*.py"))


@pytest.mark.slow
def test_training_and_its_pictures_do_not_import_torchvision(small_config):
    """torchvision's import pulls in torch._dynamo, about 10 s a command on a 2-core machine."""
    script = ("import sys; from pyro_vae import Config; from pyro_vae.train import train; "
              f"train(Config.from_dict({small_config.to_dict()!r})); "
              "assert 'torchvision' not in sys.modules, 'torchvision was imported'")
    result = processes.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(Path(small_config.out).glob("*.png")), "the run drew its pictures"


def _package_imports() -> dict[str, set[str]]:
    """module -> the pyro_vae modules it imports, at the top or inside a function (relative imports)."""
    import ast

    folder = Path(pyro_vae.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {alias.name for alias in node.names}
        graph[path.stem] = imported - {path.stem}
    return graph


def test_the_package_modules_import_each_other_without_a_circle():
    """Data flows one way (config -> data and nets -> model -> train -> ...): no module reaches itself again,
    not even through an import inside a function (config.py once took the priors, which took config's constants)."""
    graph = _package_imports()
    assert "priors" in graph["config"]  # the registries, read inside a function: the graph sees those imports too

    def path_back(start, node, seen):
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = path_back(start, nxt, seen)
                if rest:
                    return [node, *rest]
        return None

    circles = {name: path_back(name, name, set()) for name in graph}
    assert {name: circle for name, circle in circles.items() if circle} == {}


def test_the_package_is_typed_and_passes_the_linter_that_ci_runs():
    """py.typed (PEP 561: type checkers read the package's annotations), and `ruff check pyro_vae`, which .ci/run
    runs before the tests, with the rules pyproject.toml selects."""
    root = Path(__file__).resolve().parent.parent
    assert (Path(pyro_vae.__file__).parent / "py.typed").is_file()
    ci = (root / ".ci" / "run").read_text()
    assert ci.index("uv run --locked ruff check pyro_vae") < ci.index("uv run --locked pytest")
    ruff = Path(sys.executable).parent / "ruff"  # the dev group's ruff, beside python
    result = processes.run([str(ruff), "check", "pyro_vae"], cwd=root, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
