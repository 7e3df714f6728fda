"""raydrat as a package: a wheel built from the tree and installed (not editable) in a fresh
venv carries the shipped recipes and tune spaces, and its command runs from outside the
repository. Nothing is downloaded: the wheel is built without build isolation and installed
with ``--no-deps``; the fresh venv sees the test environment's packages through a path file
(which, unlike a site directory, runs none of that environment's ``.pth`` hooks, so its
editable raydrat is not on the path)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from raydrat import __version__


def _run(cmd: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{cmd}: {p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow  # 10-30 s: pip builds and installs a wheel
def test_wheel_installs_and_runs_from_outside_the_repo(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "raydrat", src / "raydrat", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(src),
        ],
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("raydrat-*.whl")
    assert wheel.name.startswith(f"raydrat-{__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "raydrat" / "tune_spaces").glob("*.yaml"))
    assert shipped and all(f"raydrat/tune_spaces/{n}" in names for n in shipped)
    assert "raydrat/recipes/debug.yaml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (purelib / "_test_env.pth").write_text(
        "\n".join([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]) + "\n"
    )
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=tmp_path,
    )

    work = tmp_path / "elsewhere"  # no recipes or spaces here: they come from the package
    work.mkdir()
    raydrat = str(venv / "bin" / "raydrat")
    assert _run([raydrat, "--version"], cwd=work).stdout.strip() == f"raydrat {__version__}"
    where = _run([str(py), "-c", "import raydrat; print(raydrat.__file__)"], cwd=work).stdout.strip()
    assert where.startswith(str(purelib)), where  # the installed copy, not the repository's
    out = _run([raydrat, "tune", "smoke", "--dry-run"], cwd=work).stdout
    assert f"{purelib}/raydrat/tune_spaces/smoke.yaml" in out
    assert "4 trial(s): 3 admitted, 1 refused" in out
