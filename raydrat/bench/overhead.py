"""``raydrat bench overhead``: what Ray Train costs over a bare PyTorch loop.

Same model, same data, same steps, same evaluation and checkpoint schedule, same thread
count, measured in one run:

(a) ``raydrat train``'s loop on one Ray Train worker (Ray Data streaming the shard,
    ``ray.train.report`` with checkpoints, MLflow metrics from rank 0);
(b) the same ``fit`` loop in this process over blocks tokenized beforehand (data loading
    is not timed), evaluating and ``torch.save``-ing a checkpoint at the same steps.

Both run :func:`raydrat.core.fit.fit`; the difference is only what Ray adds around it.
Both figures are steady-state tokens/s, as ``fit`` reports them: from the end of the first
optimizer step to the end of the last (so start-up and the first step's warm-up are excluded from both). Wall
time including start-up is printed beside them.
"""

from __future__ import annotations

import tempfile
import time

from raydrat.bench.local import LocalData, LocalRun
from raydrat.bench.report import print_table
from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.callbacks import LocalCheckpoint
from raydrat.ray_train.trainer import run_training
from raydrat.tables import write_json


def bare_loop(cfg: RaydratConfig) -> dict:
    """The baseline: the same ``fit`` in this process, over blocks tokenized beforehand,
    checkpointing with ``torch.save`` at the same steps."""
    data = LocalData.load(cfg)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = LocalRun.start(cfg, data, [LocalCheckpoint(tmp, cfg.to_dict())]).run()
    report = run.state.last_report
    return {
        "tokens_per_s": report[M.TOKENS_PER_S_AVG],
        "wall_s": time.perf_counter() - t0,
        "val_loss": report[M.VAL_LOSS],
    }


def ray_loop(cfg: RaydratConfig) -> dict:
    summary = run_training(cfg)
    return {"tokens_per_s": summary.tokens_per_s or 0.0, "wall_s": summary.wall_s, "val_loss": summary.final_val_loss}


def run_overhead(cfg: RaydratConfig, json_path: str | None = None) -> dict:
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.experiment = "raydrat-bench"
    cfg.tracking.run_name = f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    bare = bare_loop(cfg)
    ray_res = ray_loop(cfg)
    ratio = ray_res["tokens_per_s"] / bare["tokens_per_s"] if bare["tokens_per_s"] else float("nan")
    figures = {
        "ray_tokens_per_s": ray_res["tokens_per_s"],
        "bare_tokens_per_s": bare["tokens_per_s"],
        "ratio": ratio,
        "ray_wall_s": ray_res["wall_s"],
        "bare_wall_s": bare["wall_s"],
        "ray_val_loss": ray_res["val_loss"],
        "bare_val_loss": bare["val_loss"],
        "steps": cfg.train.steps,
        "config": cfg.name,
    }
    print_table(
        f"overhead: {cfg.name}, {cfg.train.steps} steps, {cfg.scaling.cpus_per_worker:g} CPU thread(s)",
        ["loop", "tokens/s (steady)", "wall s (incl. start-up)", "val loss"],
        [
            [
                "Ray Train (1 worker)",
                f"{ray_res['tokens_per_s']:,.0f}",
                f"{ray_res['wall_s']:.1f}",
                f"{ray_res['val_loss']:.4f}",
            ],
            ["bare PyTorch", f"{bare['tokens_per_s']:,.0f}", f"{bare['wall_s']:.1f}", f"{bare['val_loss']:.4f}"],
        ],
        footer=f"ratio Ray/bare tokens/s: {ratio:.3f} (goal >= 0.95)",
    )
    if json_path:
        write_json(json_path, figures)
    return figures
