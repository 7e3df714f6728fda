"""Layer dropping under DDP on two Ray Train CPU workers: a step that skips layers leaves
their parameters without gradients, which plain DDP rejects ("Expected to have finished
reduction in the prior iteration"). Both ranks draw the same slot plan (same seed) and the
run must train to the end with the replicas identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydrat.config import load_config

pytestmark = pytest.mark.slow


def test_layerdrop_with_ddp_on_two_workers(ray_local, demo_dir: Path, tmp_path: Path):
    from raydrat.train.trainer import run_training

    cfg = load_config("debug", [
        f"data.demo_dir={demo_dir}", f"train.storage_path={tmp_path}", "train.steps=4", "train.eval_every=4",
        "train.eval_batches=1", "optim.warmup_steps=1", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "sync.mode=ddp", "slots.mode=layerdrop", "slots.keep=0.5", "tracking.enabled=false",
    ])
    from raydrat.model.slots import SlotController

    # The plan both ranks draw (same seed) really drops a layer in these steps.
    slots = SlotController(cfg.slots, cfg.model.n_layer, cfg.train.steps, seed=cfg.train.seed)
    assert any(len(slots.plan(step)) < cfg.model.n_layer for step in range(cfg.train.steps))
    summary = run_training(cfg)
    assert summary.steps == 4
    assert summary.final_val_loss is not None and summary.final_val_loss < 7.0
