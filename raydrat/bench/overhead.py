"""``raydrat bench overhead``: what Ray Train costs over a bare PyTorch loop.

Same model, same data, same steps, same evaluation and checkpoint schedule, same thread
count, measured in one run:

(a) ``raydrat train``'s loop on one Ray Train worker (Ray Data streaming the shard,
    ``ray.train.report`` with checkpoints, MLflow metrics from rank 0);
(b) a bare loop in this process over blocks tokenized beforehand (data loading is not
    timed), evaluating and ``torch.save``-ing a checkpoint at the same steps.

Both figures are steady-state tokens/s: from the end of the first optimizer step to the
end of the last (so start-up and the first step's warm-up are excluded from both). Wall
time including start-up is printed beside them.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raydrat.bench.report import print_table, write_json
from raydrat.config import RaydratConfig
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.train import metrics as M
from raydrat.train.loop import build_model
from raydrat.train.optim import build_optimizer, lr_at, set_lr
from raydrat.train.step import evaluate, train_step


def _batches(blocks: list, batch_size: int) -> list[torch.Tensor]:
    n = len(blocks) // batch_size
    return [torch.from_numpy(np.stack(blocks[i * batch_size : (i + 1) * batch_size])).long() for i in range(n)]


def bare_loop(cfg: RaydratConfig) -> dict:
    """The baseline: the same step and evaluation functions in one process."""
    tc = cfg.train
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    need = tc.steps * tc.grad_accum * tc.batch_size
    train_blocks = list(itertools.islice(iter_blocks_local(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, "train"), need))
    val_blocks = list(itertools.islice(iter_blocks_local(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, "val"), tc.eval_batches * tc.batch_size))
    train_batches = _batches(train_blocks, tc.batch_size)
    val_batches = _batches(val_blocks, tc.batch_size)
    if not train_batches or not val_batches:
        raise RuntimeError("corpus too small for the benchmark: lower train.batch_size")

    t0 = time.perf_counter()
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim)
    stream = itertools.cycle(train_batches)
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.seq_len
    thr = M.Throughput(tc.steps, tokens_per_step)
    val_loss = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(tc.steps):
            set_lr(optimizer, lr_at(step, cfg.optim, tc.steps))
            loss, _ = train_step(model, optimizer, (next(stream) for _ in range(tc.grad_accum)), cfg.optim.grad_clip)
            thr.step_done()
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                loss.item()
            if done % tc.eval_every == 0 or done == tc.steps:
                val_loss = evaluate(model, val_batches, tc.eval_batches)
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, Path(tmp) / "state.pt")
    return {"tokens_per_s": thr.steady_rate(), "wall_s": time.perf_counter() - t0, "val_loss": val_loss}


def ray_loop(cfg: RaydratConfig) -> dict:
    from raydrat.train.trainer import run_training

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
            ["Ray Train (1 worker)", f"{ray_res['tokens_per_s']:,.0f}", f"{ray_res['wall_s']:.1f}", f"{ray_res['val_loss']:.4f}"],
            ["bare PyTorch", f"{bare['tokens_per_s']:,.0f}", f"{bare['wall_s']:.1f}", f"{bare['val_loss']:.4f}"],
        ],
        footer=f"ratio Ray/bare tokens/s: {ratio:.3f} (goal >= 0.95)",
    )
    if json_path:
        write_json(json_path, figures)
    return figures
