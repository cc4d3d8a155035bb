import importlib.util
import sys
import warnings
from pathlib import Path

import pyro
import pytest

from pyro_vae.config import Config
from pyro_vae.data import unpack


@pytest.fixture(autouse=True)
def pyro_state():
    """Each test starts with validation on, a fixed seed and an empty param store."""
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=RuntimeWarning)
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The shipped MNIST, unpacked (and checksum-verified) once for the whole session."""
    path = tmp_path_factory.mktemp("mnist")
    unpack(path)
    return path


@pytest.fixture
def small_config(data_dir, tmp_path):
    """A config that trains in seconds on a few hundred images."""
    return Config(epochs=2, batch_size=64, train_size=512, test_size=256, latent_dim=4, conv_channels=(8, 16),
                  data_dir=str(data_dir), out=str(tmp_path / "run"), device="cpu")


@pytest.fixture
def experiment_script(monkeypatch):
    """Import a script of experiments/ (run.py, campaign.py) as a module, experiments/ on sys.path as when run."""
    folder = Path(__file__).resolve().parent.parent / "experiments"
    monkeypatch.syspath_prepend(str(folder))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"experiments_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load
