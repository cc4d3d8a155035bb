"""The package as pip installs it: the wheel, in a clean environment, used from an empty folder, offline.

The clean environment is a new virtual environment holding only the wheel (installed with --no-deps); its
dependencies (torch, pyro, ...) come from the project's own environment through a .pth line, so the test needs no
network and no second copy of torch. The checkout is not on its path: what the commands find, they find in the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(args, cwd, env, timeout=600):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder, an empty working folder, the environment to run in) with the freshly built wheel installed."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is not on PATH (the README's set-up installs it)"
    base = tmp_path_factory.mktemp("wheel")
    _run([uv, "build", "--wheel", "--out-dir", str(base / "dist"), str(ROOT)], cwd=base, env=os.environ)
    (wheel,) = (base / "dist").glob("pyro_vae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyro_vae/_data/mnist/SHA256SUMS" in names and "pyro_vae/_data/pretrained/best_cpu/checkpoint.pt" in names

    venv = base / "venv"
    _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=base, env=os.environ)
    python = venv / "bin" / "python"
    _run([uv, "pip", "install", "--quiet", "--offline", "--no-deps", "--python", str(python), str(wheel)],
         cwd=base, env=os.environ)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(python), "-c", where], text=True).strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, pyro, ...

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYRO_VAE_DATA")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               HOME=str(base / "home"))  # no ~/.cache/pyro_vae from an earlier run to lean on
    work = base / "empty"
    work.mkdir()
    where = _run([str(python), "-c", "import pyro_vae; print(pyro_vae.__file__)"], cwd=work, env=env).stdout
    assert Path(where.strip()).is_relative_to(site), where  # the wheel's copy, not the checkout's
    return venv / "bin", work, env


def test_the_installed_command_trains_offline_from_an_empty_folder(installed):
    bin_dir, work, env = installed
    _run([str(bin_dir / "pyro-vae"), "train", "--epochs", "1", "--max-steps", "3", "--test-size", "100",
          "--out", "run"], cwd=work, env=env)
    row = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 3 and np.isfinite(row["test_elbo"])


def test_the_installed_library_loads_shipped_runs_by_path_and_by_name(installed):
    bin_dir, work, env = installed
    out = _run([str(bin_dir / "python"), "-c",
                "import pyro_vae\n"
                "a = pyro_vae.load('pretrained/best_cpu'); b = pyro_vae.load('best_cpu')\n"
                "print(a.config.guide, a.config.prior, b.config == a.config)"], cwd=work, env=env).stdout.split()
    assert out == ["iaf", "flow", "True"]


def test_the_installed_codec_compresses_and_restores_ten_images_and_evaluate_and_plot_run(installed):
    bin_dir, work, env = installed
    pyro_vae = str(bin_dir / "pyro-vae")
    _run([pyro_vae, "compress", "pretrained/conv32_full", "ten.pvae", "--limit", "10"], cwd=work, env=env)
    _run([pyro_vae, "compress", "--decode", "ten.pvae", "ten.npy"], cwd=work, env=env)
    decoded = np.load(work / "ten.npy")
    assert decoded.shape[0] == 10 and set(np.unique(decoded)) <= {0, 1}
    _run([pyro_vae, "evaluate", "conv32", "--k", "2", "--limit", "20"], cwd=work, env=env)
    assert json.loads((work / "runs" / "conv32" / "evaluation.json").read_text())
    _run([pyro_vae, "plot", "conv32", "--out", "pictures"], cwd=work, env=env)
    assert any((work / "pictures").glob("*.png"))
