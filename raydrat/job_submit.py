"""``raydrat job submit [RAY JOB SUBMIT OPTIONS] -- ENTRYPOINT``: ``ray job submit`` with
``jobs/runtime_env.yaml``, from the root of a raydrat checkout, after checking the wheel that
runtime env installs.

``ray job submit --runtime-env jobs/runtime_env.yaml`` works as it is; what this adds:

* the wheel (``jobs/dist/raydrat-<version>-py3-none-any.whl``) must exist and hold the
  checkout's code: a missing or stale wheel is one line naming the build command, here,
  instead of a failed environment set-up on the cluster (or a job running yesterday's code);
* the wheel's sha256 is pinned in the requirement Ray's pip runtime env installs
  (``raydrat @ file://${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/dist/...whl#sha256=...``): Ray
  keeps one environment per ``pip`` section, so an unchanged section would reuse the
  environment built from an earlier wheel of the same name; the pin makes a rebuilt wheel a
  new environment, and pip checks the file against it.

Every other option (``--address``, ``--submission-id``, ``--no-wait``, ...) goes to ``ray
job submit`` unchanged; ``--runtime-env``, ``--runtime-env-json`` and ``--working-dir`` are
this command's to set.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from raydrat import __version__
from raydrat.config import ConfigError

RUNTIME_ENV = Path("jobs") / "runtime_env.yaml"
WORKING_DIR_VAR = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"
BUILD_COMMAND = "python -m pip wheel --no-deps -w jobs/dist ."
PACKAGE = "raydrat"
PACKAGE_DATA = ("recipes/*.yaml", "tune_spaces/*.yaml")
OWN_OPTIONS = ("--runtime-env", "--runtime-env-json", "--working-dir")


def wheel_name(version: str = __version__) -> str:
    return f"{PACKAGE}-{version}-py3-none-any.whl"


def load_runtime_env(checkout: Path) -> dict:
    path = checkout / RUNTIME_ENV
    if not path.is_file():
        raise ConfigError(
            f"no {RUNTIME_ENV} in {checkout}: run `raydrat job submit` from the root of a raydrat checkout"
        )
    return yaml.safe_load(path.read_text())


def wheel_requirement(env: dict) -> str:
    """The runtime env's requirement of the raydrat wheel (a path under the working dir)."""
    packages = (env.get("pip") or {}).get("packages", []) if isinstance(env.get("pip"), dict) else env.get("pip", [])
    found = [p for p in packages if p.startswith(WORKING_DIR_VAR) and p.endswith(".whl")]
    if len(found) != 1:
        raise ConfigError(f"{RUNTIME_ENV}: its pip section must install one wheel from {WORKING_DIR_VAR}/dist/")
    return found[0]


def local_wheel(checkout: Path, env: dict) -> Path:
    """Where the wheel the runtime env installs lies in the checkout."""
    requirement = wheel_requirement(env)
    return checkout / env.get("working_dir", ".") / requirement.removeprefix(WORKING_DIR_VAR + "/")


def _digest(data: bytes) -> str:
    """A file's hash as a wheel's RECORD writes it."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def package_files(checkout: Path) -> dict[str, str]:
    """The checkout's package files (what the wheel ships: modules and package data), by
    their path in the wheel, with their RECORD hashes."""
    root = checkout / PACKAGE
    paths = [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    for pattern in PACKAGE_DATA:
        paths += root.glob(pattern)
    return {p.relative_to(checkout).as_posix(): _digest(p.read_bytes()) for p in paths}


def wheel_files(wheel: Path) -> dict[str, str]:
    """The package files in ``wheel`` with their hashes, from its RECORD."""
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = csv.reader(io.StringIO(z.read(record).decode()))
        return {r[0]: r[1] for r in rows if r and r[0].startswith(PACKAGE + "/")}


def check_wheel(checkout: Path) -> Path:
    """The wheel ``jobs/runtime_env.yaml`` installs, present, of this version and holding
    the checkout's code; otherwise one line that says how to build it."""
    env = load_runtime_env(checkout)
    wheel = local_wheel(checkout, env)
    shown = wheel.relative_to(checkout)
    if wheel.name != wheel_name():
        raise ConfigError(
            f"{RUNTIME_ENV} installs {wheel.name}, but the checkout is raydrat {__version__}: "
            f"name {wheel_name()} in its pip section"
        )
    if not wheel.is_file():
        raise ConfigError(f"{RUNTIME_ENV} installs {shown}, which is missing: build it with `{BUILD_COMMAND}`")
    ours, theirs = package_files(checkout), wheel_files(wheel)
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise ConfigError(
            f"{shown} does not hold the checkout's code ({len(differ)} file(s) differ, e.g. {differ[0]}): "
            f"rebuild it with `{BUILD_COMMAND}`"
        )
    return wheel


def pinned_runtime_env(checkout: Path) -> dict:
    """``jobs/runtime_env.yaml`` with the wheel's requirement pinned to its sha256 (a new
    wheel is a new environment on the cluster) and the working dir made absolute."""
    env = load_runtime_env(checkout)
    wheel = check_wheel(checkout)
    requirement = wheel_requirement(env)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pinned = f"{PACKAGE} @ file://{requirement}#sha256={sha}"
    pip = env["pip"]
    if isinstance(pip, dict):
        pip = {**pip, "packages": [pinned if p == requirement else p for p in pip["packages"]]}
    else:
        pip = [pinned if p == requirement else p for p in pip]
    return {**env, "pip": pip, "working_dir": str((checkout / env.get("working_dir", ".")).resolve())}


def submit_command(argv: list[str], checkout: Path) -> list[str]:
    """The ``ray job submit`` command line for ``argv`` (options, ``--``, entrypoint)."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    taken = [o for o in options if o.split("=", 1)[0] in OWN_OPTIONS]
    if taken:
        raise ConfigError(
            f"raydrat job submit sets {', '.join(OWN_OPTIONS)} itself (from {RUNTIME_ENV}): drop {taken[0]}"
        )
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise ConfigError("raydrat job submit: give the entrypoint after `--`, e.g. -- python train.py debug")
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    return [ray, "job", "submit", "--runtime-env-json", json.dumps(pinned_runtime_env(checkout)), *argv]


def main(argv: list[str], checkout: Path | None = None) -> int:
    """Run ``ray job submit`` (its output and exit status are this command's)."""
    cmd = submit_command(argv, (checkout or Path.cwd()).resolve())
    entry = argv[argv.index("--") + 1 :]
    print(f"[raydrat] ray job submit (runtime env {RUNTIME_ENV}, wheel pinned) -- {shlex.join(entry)}", flush=True)
    return subprocess.run(cmd).returncode
