"""Python environments for tests that need one without some of this one's packages: a venv
(no pip of its own) whose path file lists a folder of links to every entry of this
environment's site-packages except the packages left out. A path file runs none of those
entries' own ``.pth`` hooks, so an editable install's finder stays out too."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path


def bare_python(root: Path, without: tuple[str, ...] = ("raydrat",)) -> Path:
    """The interpreter of a venv under ``root`` that sees this environment's packages, those
    whose entries' names contain one of ``without`` excepted (dist-info, modules, hooks)."""
    links = root / "site"
    links.mkdir(parents=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        if not any(name in entry.name.lower() for name in without):
            (links / entry.name).symlink_to(entry)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    own = subprocess.check_output(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    (Path(own.strip()) / "_test_env.pth").write_text(f"{links}\n")
    return py
