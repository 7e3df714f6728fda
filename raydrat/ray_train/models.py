"""The run's models as MLflow models, logged by the driver once Ray Train has finished.

The final model (the newest checkpoint) is logged as ``model``; the best by validation loss,
when it is another checkpoint, as ``best_model``. Both are plain :class:`GPT` modules (no
recompute or DDP wrappers) rebuilt from rank 0's ``state.pt``, so
``mlflow.pytorch.load_model`` returns a model that runs as ``model(idx)``.
``tracking.register_model: NAME`` registers the best one (the final one when no save was
scored) as a new version of ``NAME``.
"""

from __future__ import annotations

from pathlib import Path

import ray.train

from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.checkpoint.state import load_state
from raydrat.core.model.transformer import GPT
from raydrat.core.techniques.sync.fsdp import load_full_model
from raydrat.tracking import Run

FINAL, BEST = "model", "best_model"


def best_checkpoint(result: ray.train.Result) -> tuple[str | None, float | None]:
    """(path, val loss) of the scored checkpoint with the lowest validation loss."""
    scored = [(c.path, m.get(M.CHECKPOINT_SCORE)) for c, m in (result.best_checkpoints or [])]
    scored = [(p, s) for p, s in scored if s is not None and s < M.UNSCORED]
    return min(scored, key=lambda ps: ps[1]) if scored else (None, None)


def model_from_checkpoint(path: str) -> tuple[GPT, dict]:
    state = load_state(path)
    cfg = RaydratConfig.model_validate(state["config"])
    model = GPT(cfg.model)
    if state.get("sharded"):  # FSDP: the weights are in the checkpoint's DCP shards
        load_full_model(path, model)
    else:
        model.load_state_dict(state["model"])
    return model.eval(), state


def log_run_models(run: Run, cfg: RaydratConfig, result: ray.train.Result, register: bool = True) -> dict[str, str]:
    """Log the final and best models of ``result`` to ``run``; returns name -> model URI.
    ``register=False``: log only (a sweep's trial: the sweep registers its best trial's)."""
    if not run or not cfg.tracking.log_model or result.checkpoint is None:
        return {}
    final = result.checkpoint.path
    best, best_loss = best_checkpoint(result)
    same = best is None or Path(best).name == Path(final).name
    register = cfg.tracking.register_model if register else None
    out = {}
    model, state = model_from_checkpoint(final)
    out[FINAL] = run.log_model(
        model,
        FINAL,
        registered_model_name=register if same else None,
        metadata={"step": state["step"], "checkpoint": Path(final).name},
        step=int(state["step"]),
    )
    if not same:
        model, state = model_from_checkpoint(best)
        out[BEST] = run.log_model(
            model,
            BEST,
            registered_model_name=register,
            metadata={"step": state["step"], "checkpoint": Path(best).name, M.VAL_LOSS: best_loss},
            step=int(state["step"]),
        )
    return out


def register_run_model(run: Run, name: str) -> str | None:
    """Register the model logged to ``run`` (its best by validation loss when it has one,
    else its final model) as a new version of ``name``; the version, or ``None`` when the
    run logged no model."""
    logged = run.logged_models()
    chosen = logged.get(BEST) or logged.get(FINAL)
    return run.register_model(chosen, name) if chosen else None
