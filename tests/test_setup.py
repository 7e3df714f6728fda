"""The one setup and the one evaluation: every run's state is built by
``core.setup.build_fit_state`` (the Ray Train worker and the in-process LocalRun start from
the same parameters, technique state and optimizer for one config and rank; no other module
builds techniques, an optimizer or a FitState), a model built for inference cannot be
trained, and the training loop's val loss is ``core.evaluate.evaluate``'s."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from raydrat.bench.local import LocalData, LocalRun
from raydrat.config import load_config
from raydrat.core import metrics as M
from raydrat.core.evaluate import evaluate
from raydrat.core.fit import Callback, FitState, fit
from raydrat.core.runtime import resolve
from raydrat.core.setup import build_fit_state
from raydrat.core.techniques.base import unwrap

REPO = Path(__file__).resolve().parents[1]
SEAM = REPO / "raydrat" / "core" / "setup.py"
BUILDERS = {"build_techniques", "apply_techniques", "attach_optimizer", "initial_model", "FitState"}

# the snapshot callback travels to the Ray worker by value (the workers cannot import the tests)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cfg(*overrides: str):
    return load_config(
        "debug",
        [
            "train.steps=4",
            "train.eval_every=2",
            "train.log_every=1",
            "optim.warmup_steps=1",
            "recompute.mode=gated",
            "slots.mode=layerdrop",
            "scaling.cpus_per_worker=1",
            *overrides,
        ],
    )


def _start(state: FitState) -> dict:
    """What a run starts from: the plain model's weights, the wrappers and techniques it
    trains with, their state, the optimizer's settings and the threads."""
    return {
        "weights": {k: v.detach().cpu().clone() for k, v in unwrap(state.model).state_dict().items()},
        "wrapped_as": type(state.model).__name__,
        "techniques": [type(t).__name__ for t in state.techniques.all()],
        "technique_state": state.techniques.state_dict(),
        "optimizer": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": len(g["params"])}
            for g in state.optimizer.param_groups
        ],
        "threads": torch.get_num_threads(),
        "rank": (state.rank, state.world_size),
    }


class Snapshot(Callback):
    """Saves what the run starts from (:func:`_start`) to ``path`` as the fit starts."""

    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, state: FitState) -> None:
        torch.save(_start(state), self.path)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_only_the_setup_builds_a_runs_state():
    """No module but ``core/setup.py`` builds the techniques, applies them, attaches the
    optimizer, makes the initial model or a FitState: a change to how a run starts is made
    in one place."""
    found = []
    for path in (REPO / "raydrat").rglob("*.py"):
        if path == SEAM:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in BUILDERS:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert found == []


def test_a_model_built_for_inference_has_no_optimizer_and_cannot_be_trained():
    cfg = _cfg()
    state = build_fit_state(cfg, None, torch.device("cpu"), inference=True)
    assert state.optimizer is None and not state.model.training
    assert type(state.model).__name__ == "GPT"  # no technique's wrapper
    blocks = iter([torch.zeros(cfg.train.batch_size, cfg.model.seq_len + 1, dtype=torch.long)] * 10)
    with pytest.raises(ValueError, match="built for inference"):
        fit(state, blocks, lambda: [])


def test_the_loops_val_loss_is_the_one_evaluation():
    cfg = _cfg()
    data = LocalData.random(cfg, cfg.train.steps)
    run = LocalRun.start(cfg, data).run()
    report = run.state.last_report
    assert report[M.STEP] == cfg.train.steps
    assert report[M.VAL_LOSS] == evaluate(run.model, data.val, cfg.train.eval_batches).loss


def test_two_builds_of_one_config_start_alike_and_the_seed_sets_the_weights():
    cfg = _cfg()
    runtime = resolve(cfg, gpus=0)
    cpu = torch.device("cpu")
    first = _start(build_fit_state(cfg, runtime, cpu))
    assert _same(first, _start(build_fit_state(cfg, runtime, cpu)))
    reseeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})})
    assert not _same(first["weights"], _start(build_fit_state(reseeded, runtime, cpu))["weights"])


@pytest.mark.slow
def test_the_ray_worker_and_a_local_run_start_from_the_same_state(ray_local, demo_dir, tmp_path, monkeypatch):
    from raydrat.ray_train.trainer import run_training

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(f"data.demo_dir={demo_dir}", f"train.storage_path={tmp_path / 'runs'}", "tracking.enabled=false")
    run_training(cfg, fit_callbacks=[Snapshot(tmp_path / "worker.pt")])
    worker = torch.load(tmp_path / "worker.pt", weights_only=False)
    local = _start(LocalRun.start(cfg, LocalData.random(cfg, cfg.train.steps)).state)
    assert worker.keys() == local.keys()
    assert worker["techniques"] == local["techniques"] and "GatedRecompute" in worker["techniques"]
    assert worker["technique_state"], "gated recompute and layerdrop keep state: the comparison must see some"
    for key in worker:
        assert _same(worker[key], local[key]), key
