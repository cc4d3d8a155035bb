import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pyro
import pytest

import processes
from pyro_vae.config import Config
from pyro_vae.data import unpack


SEED = int(os.environ.get("PYRO_VAE_TEST_SEED", "0"))  # every test's seed; a Monte Carlo check must pass for any
# Pyro's checks that model and guide agree only warn; in the tests a mismatch is an error
MISMATCH_WARNINGS = ("Found vars in model but not guide", "Found non-auxiliary vars in guide but not model",
                     "Found auxiliary vars in the model", "Found plate statements in guide but not model",
                     "Model vars changed")


@pytest.fixture(autouse=True)
def pyro_state():
    """Each test starts with validation on, the seed PYRO_VAE_TEST_SEED (default 0) and an empty param store;
    RuntimeWarnings and Pyro's model/guide mismatch warnings are errors."""
    pyro.enable_validation(True)
    pyro.set_rng_seed(SEED)
    pyro.clear_param_store()
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=RuntimeWarning)
        for message in MISMATCH_WARNINGS:
            warnings.filterwarnings("error", message=message)
        yield


@pytest.fixture(autouse=True, scope="session")
def no_process_left():
    """Each test ends the processes it starts (tests/processes.py); any still there at the end, as after a
    second Ctrl-C, are ended with the session."""
    yield
    processes.end_all()


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
