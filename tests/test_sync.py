"""Sync strategies on two real Ray Train CPU workers (gloo), one worker group for all
variants: replicas agree after a sync, local/1 + SGD equals DDP, bytes counted match the
parameter bytes / sync_steps. Plus config errors for bad sync settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from raydrat.config import ConfigError, load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sync_rows(ray_local, demo_dir: Path, tmp_path_factory):
    from raydrat.bench.sync import run_sync_workers

    tmp = tmp_path_factory.mktemp("sync")
    cfg = load_config("debug", [
        f"data.demo_dir={demo_dir}", f"train.storage_path={tmp}", "train.steps=8", "optim.warmup_steps=2",
        "optim.name=sgd", "optim.lr=0.5", "optim.grad_clip=0", "train.eval_batches=1",
        "scaling.cpus_per_worker=0.5",
    ])
    variants = [
        {"mode": "ddp", "sync_steps": 1},
        {"mode": "local", "sync_steps": 1},
        {"mode": "local", "sync_steps": 4},
        {"mode": "local", "sync_steps": 2, "outer_optimizer": "nesterov", "average_optimizer_state": True},
    ]
    rows = run_sync_workers(cfg, variants, workers=2)
    return {r["label"]: r for r in rows}


def test_replicas_identical_after_sync(sync_rows):
    for label, row in sync_rows.items():
        a, b = row["checksums"]
        assert a == b, f"{label}: ranks disagree after the final sync ({a} vs {b})"


def test_local_one_step_sgd_equals_ddp(sync_rows):
    ddp, local = sync_rows["ddp"]["checksums"][0], sync_rows["local/1"]["checksums"][0]
    assert local == pytest.approx(ddp, rel=1e-5)
    # ... while more local steps really do train differently
    assert sync_rows["local/4"]["checksums"][0] != pytest.approx(ddp, rel=1e-5)
    assert sync_rows["local/1"]["val_loss"] == pytest.approx(sync_rows["ddp"]["val_loss"], rel=1e-4)


def test_bytes_match_parameter_bytes_over_sync_steps(sync_rows):
    pbytes = sync_rows["ddp"]["param_bytes"]
    # 2 workers: a ring all-reduce sends 2(W-1)/W = 1 x the payload per worker
    assert sync_rows["ddp"]["bytes_per_step"] == pbytes
    assert sync_rows["local/1"]["bytes_per_step"] == pbytes
    assert sync_rows["local/4"]["bytes_per_step"] == pbytes / 4
    for row in sync_rows.values():
        assert 0 < row["comm_fraction"] < 1
        assert row["tokens_per_s"] > 0


@pytest.mark.parametrize("overrides, needles", [
    (["sync.mode=local", "sync.sync_steps=0"], ["sync.sync_steps", "greater than or equal to 1"]),
    (["sync.mode=local", "sync.bucket_cap_mb=10"], ["sync.bucket_cap_mb", "sync.mode=ddp"]),
    (["sync.sync_steps=4"], ["sync.sync_steps", "sync.mode=local"]),
    (["sync.mode=allreduce"], ["sync.mode"]),
])
def test_bad_sync_settings(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config("debug", overrides)
    for needle in needles:
        assert needle in str(err.value)
