"""raydrat as a package: the wheel built from the tree, installed with its dependencies into
a fresh venv (pip's own resolution; torch from the local wheel file of the version this
environment runs, so no CUDA build is fetched), and used from a directory that is not the
repository: the shipped recipes and tune spaces come from the package, and `raydrat train
debug` trains a few steps, from its own demo corpus to an MLflow run."""

from __future__ import annotations

import glob
import os
import shutil
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


def _find_links() -> list[str]:
    """The folders pip is told to find wheels in (its environment, then its config)."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    conf = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    for line in conf.splitlines():
        if "find-links" in line:
            found += line.split("=", 1)[1].strip().strip("'\"").split()
    return [f.removeprefix("file://") for f in found]


def local_torch_wheel() -> Path:
    """The wheel file of the torch this environment runs, from pip's find-links folders."""
    for folder in _find_links():
        hits = glob.glob(os.path.join(folder, f"torch-{torch.__version__}-*.whl"))
        if hits:
            return Path(hits[0])
    pytest.fail(
        f"no torch-{torch.__version__}-*.whl in pip's find-links folders {_find_links()}: put the wheel of the torch "
        "this environment runs there (the fresh venv must not download another build)"
    )


@pytest.mark.slow  # a few minutes: pip installs raydrat's dependencies into a fresh venv, then a run trains
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

    venv = tmp_path / "venv"  # fresh: its own pip, none of this environment's packages
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    torch_wheel = local_torch_wheel()
    t_install = time.perf_counter()
    _run([str(py), "-m", "pip", "install", "-q", str(wheel), str(torch_wheel)], cwd=tmp_path, timeout=1500)
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
