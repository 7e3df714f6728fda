"""raydrat as a package: the wheel built from the tree, installed into a fresh venv whose
dependencies are this environment's (a ``.pth`` file lists its site-packages; pip, with no
index, resolves the wheel's requirements against those versions and installs raydrat
alone: a requirement they do not meet fails here), and used from a directory that is not
the repository: the shipped recipes and tune spaces come from the package, and `raydrat
train debug` trains a few steps, from its own demo corpus to an MLflow run. Resolving the
dependencies from an index is what `make venv` does on every fresh machine."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO

from raydrat import __version__


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{cmd}: {p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow  # about a minute: a wheel built and installed, a run trains
def test_wheel_installs_into_a_fresh_venv_and_trains_from_outside_the_repo(tmp_path):
    t0 = time.perf_counter()
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "raydrat", src / "raydrat", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(dist), str(src)], cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("raydrat-*.whl")
    assert wheel.name == f"raydrat-{__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "raydrat" / "tune_spaces").glob("*.yaml"))
    assert shipped and all(f"raydrat/tune_spaces/{n}" in names for n in shipped)
    assert "raydrat/recipes/debug.yaml" in names

    venv = tmp_path / "venv"  # fresh: its own pip, and this environment's packages beneath its own
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    own = _run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], cwd=tmp_path).stdout.strip()
    Path(own, "environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(py), "-m", "pip", "uninstall", "-y", "-q", "setuptools"], cwd=tmp_path)  # the venv's old one would shadow
    t_install = time.perf_counter()
    _run([str(py), "-m", "pip", "install", "-q", "--no-index", str(wheel)], cwd=tmp_path)
    install_s = time.perf_counter() - t_install
    listed = _run([str(py), "-m", "pip", "list", "--format=freeze"], cwd=tmp_path).stdout
    assert f"raydrat=={__version__}" in listed and f"torch=={torch.__version__}" in listed

    work = tmp_path / "elsewhere"  # no recipes, spaces or sources here: they come from the package
    work.mkdir()
    raydrat = str(venv / "bin" / "raydrat")
    assert _run([raydrat, "--version"], cwd=work).stdout.strip() == f"raydrat {__version__}"
    where = _run([str(py), "-c", "import raydrat; print(raydrat.__file__)"], cwd=work).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the repository's
    out = _run([raydrat, "tune", "smoke", "--dry-run"], cwd=work).stdout
    assert "raydrat/tune_spaces/smoke.yaml" in out and "4 trial(s): 3 admitted, 1 refused" in out
    assert list(work.iterdir()) == []  # a dry run writes nothing

    steps = ["--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=1"]
    trained = _run([raydrat, "train", "debug", *steps, "--set", "optim.warmup_steps=1"], cwd=work, timeout=900)
    assert "run debug-" in trained.stdout and "4 steps in" in trained.stdout
    assert "final validation loss:" in trained.stdout
    assert (work / "mlruns.db").exists() and (work / "data" / "demo" / "manifest.json").exists()
    print(
        f"wheel test: {time.perf_counter() - t0:.0f}s in all, of which pip install {install_s:.0f}s "
        f"(load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])})"
    )
