"""Op-level budget plans kept on disk between runs (``recompute.plan_cache``,
``$RAYDRAT_PLAN_CACHE``).

Why: an op-level plan comes from op times measured at the first step. They drift a little
from run to run, so two runs of one config can store different op outputs, and under
``torch.compile`` a plan that stores one other tensor is another graph: none of inductor's
on-disk caches (its FX graphs, its compiled kernels) are hit, and the run compiles from
scratch, minutes on a small CPU, where ``torch._functorch.config.activation_memory_budget``,
a function of the graph alone, is served from those caches on every run after the first. A
plan recalled from here is the same plan, so the same graph: the cost measurement is
skipped and the compile is served from inductor's caches as torch's is.

An entry is one JSON file, written atomically (a temporary file in the same folder, then
``os.replace``), named by the SHA-256 of its key and holding the key beside the plan. The
key is everything that changes the traced graph or the measured costs (:func:`plan_key`):
the model config, the micro-batch shape, the budget in bytes, eager or compiled, the
autocast dtype, the device (its type and name; on CPU the processor and the intra-op
threads, which the op times depend on), the torch version, and a digest of the source of
the model and the recompute packages (a change to either plans anew). An entry that cannot
be read, is malformed, or holds another key is ignored with one log line (and replaced by
the new plan).

``$RAYDRAT_PLAN_CACHE``: the folder (default ``$XDG_CACHE_HOME/raydrat/plans``, else
``~/.cache/raydrat/plans``), or ``off`` (also ``0``, ``false``, ``no``) to turn the cache off;
``recompute.plan_cache: false`` turns it off for one config.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from raydrat.atomic import write_text
from raydrat.core import model as model_package
from raydrat.core.techniques import recompute as recompute_package
from raydrat.core.techniques.recompute.op_costs import POST, PRE
from raydrat.core.techniques.recompute.op_plan import OpPlan, plan_from_json, plan_to_json

ENV = "RAYDRAT_PLAN_CACHE"
OFF = ("off", "0", "false", "no")
FORMAT = 1
"""Version of the entry layout (a new one makes every older entry another key)."""

log = logging.getLogger("raydrat")


def default_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "raydrat" / "plans"


def plan_cache(enabled: bool = True) -> PlanCache | None:
    """The cache ``recompute.plan_cache`` (``enabled``) and ``$RAYDRAT_PLAN_CACHE`` ask
    for; ``None`` when either turns it off."""
    setting = os.environ.get(ENV, "").strip()
    if not enabled or setting.lower() in OFF:
        return None
    return PlanCache(Path(setting).expanduser() if setting else default_folder())


@functools.cache
def code_digest() -> str:
    """SHA-256 of the source of the model and the recompute packages: the code that decides
    the op sequence, the costs and the plans."""
    digest = hashlib.sha256()
    for package in (model_package, recompute_package):
        root = Path(package.__file__).parent
        for path in sorted(root.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What the measured op times depend on: the GPU's name, or the processor and the
    intra-op threads."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    return f"{_cpu_name()}, {torch.get_num_threads()} threads"


def autocast_dtype(autocast: AbstractContextManager, device: torch.device) -> str:
    """The dtype ops run in under ``autocast`` on ``device`` (``float32`` when it is off)."""
    with autocast:
        if torch.is_autocast_enabled(device.type):
            return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
    return "float32"


def plan_key(
    model_cfg: dict, batch: tuple[int, ...], budget_bytes: int, compiled: bool, dtype: str, device: torch.device
) -> dict[str, Any]:
    """Everything that changes the traced graph or the measured costs (JSON values)."""
    key = {
        "format": FORMAT,
        "code": code_digest(),
        "torch": torch.__version__,
        "device": device.type,
        "device_name": device_name(device),
        "dtype": dtype,
        "model": model_cfg,
        "batch": list(batch),
        "budget_bytes": int(budget_bytes),
        "compiled": bool(compiled),
    }
    return json.loads(json.dumps(key, sort_keys=True))


class PlanCache:
    """Plans on disk under ``folder``, one JSON file per :func:`plan_key`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: dict) -> Path:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{name}.json"

    def load(self, key: dict) -> OpPlan | None:
        """The plan stored under ``key``; ``None`` when there is none, or (with one log line)
        when the entry cannot be read, is malformed or holds another key."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            if not isinstance(entry, dict) or entry.get("key") != key:
                raise ValueError("it holds another model, batch, budget, device or code version")
            plan = plan_from_json(entry["plan"])
            _check(plan, key)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning(f"recompute: ignoring the cached op-level plan {path} ({err}); planning anew")
            return None
        return plan

    def store(self, key: dict, plan: OpPlan) -> Path | None:
        """Write ``plan`` under ``key`` atomically (readers see the old entry or the new one,
        never a part); a folder that cannot be written is one log line, not an error."""
        path = self.path(key)
        text = json.dumps({"key": key, "plan": plan_to_json(plan)}, sort_keys=True)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(path, text, durable=True)
        except OSError as err:
            log.warning(f"recompute: could not cache the op-level plan in {self.folder} ({err})")
            return None
        return path


def _check(plan: OpPlan, key: dict) -> None:
    """A plan fit for ``key``: a budget plan of its budget and execution mode, within it,
    naming only blocks the model has."""
    if plan.mode != "budget" or plan.compiled != key["compiled"] or plan.budget_bytes != key["budget_bytes"]:
        raise ValueError("not a budget plan of this budget and execution mode")
    if plan.predicted_bytes is None or plan.predicted_bytes > plan.budget_bytes:
        raise ValueError("its predicted bytes exceed its budget")
    layers = range(key["model"]["n_layer"])
    regions = {k[0] for k in plan.saved} | plan.plain_blocks | plan.full_blocks
    if any(r not in layers and r not in (PRE, POST) for r in regions):
        raise ValueError("it names blocks the model does not have")
