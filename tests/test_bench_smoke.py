"""The two headline benchmarks run end to end through the command line, on real Ray, at a
size that takes seconds: ``raydrat bench overhead`` (Ray Train loop against a bare PyTorch
loop) and ``raydrat bench ingest`` (Ray Data against a single-process baseline). Each prints
its table and writes JSON figures that agree with it. Marked slow: they start Ray Train and
Ray Data pipelines (about a minute together on 2 cores)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raydrat.cli import main

pytestmark = pytest.mark.slow


def _table_row(out: str, first_cell: str) -> list[str]:
    """The cells of the printed table row whose first cell is ``first_cell``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{out}")


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_bench_overhead_prints_and_writes_both_loops(ray_local, demo_dir: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the run's MLflow store and checkpoints stay in the test's folder
    path = tmp_path / "overhead.json"
    rc = main(
        [
            "bench",
            "overhead",
            "debug",
            "--set",
            f"data.demo_dir={demo_dir}",
            "--set",
            f"train.storage_path={tmp_path / 'runs'}",
            "--set",
            "train.steps=8",
            "--set",
            "train.eval_every=4",
            "--set",
            "train.log_every=4",
            "--json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    figures = json.loads(path.read_text())
    assert {"ray_tokens_per_s", "bare_tokens_per_s", "ratio", "ray_wall_s", "bare_wall_s"} <= set(figures)
    assert figures["steps"] == 8 and figures["config"] == "debug"
    assert figures["ray_tokens_per_s"] > 0 and figures["bare_tokens_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["ray_tokens_per_s"] / figures["bare_tokens_per_s"])
    assert figures["ray_wall_s"] > 0 and figures["bare_wall_s"] > 0
    for loss in (figures["ray_val_loss"], figures["bare_val_loss"]):
        assert 0 < loss < math.log(512) + 1  # a debug model (vocab 512) that trained, not diverged
    ray_row, bare_row = _table_row(out, "Ray Train (1 worker)"), _table_row(out, "bare PyTorch")
    assert _number(ray_row[1]) == pytest.approx(figures["ray_tokens_per_s"], abs=1)
    assert _number(bare_row[1]) == pytest.approx(figures["bare_tokens_per_s"], abs=1)
    assert f"ratio Ray/bare tokens/s: {figures['ratio']:.3f}" in out
    assert list((tmp_path / "runs").rglob("state.pt"))  # the Ray loop checkpointed as training does


def test_bench_ingest_prints_and_writes_every_pipeline(ray_local, tmp_path: Path, capsys):
    path = tmp_path / "ingest.json"
    rc = main(["bench", "ingest", "debug", "--mb", "0.3", "--workdir", str(tmp_path), "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    figures = json.loads(path.read_text())
    assert figures["config"] == "debug" and figures["cpus"] >= 1 and figures["train_tokens_per_s"] > 0
    (size,) = figures["sizes"]
    assert size["corpus_mb"] == 0.3
    # the Ray pipeline (actors and tasks) and the baseline packed the very same tokens
    assert size["tokens_match"] is True and size["tokens"] > 0 and size["tokens"] % 65 == 0  # seq_len 64 + 1
    for key in ("ray_tokens_per_s", "ray_tasks_tokens_per_s", "baseline_tokens_per_s"):
        assert size[key] > 0, key
    assert size["ratio"] == pytest.approx(size["ray_tokens_per_s"] / size["baseline_tokens_per_s"])
    assert size["ingest_over_train"] == pytest.approx(size["ray_tokens_per_s"] / figures["train_tokens_per_s"])
    assert size["peak_rss_mb"]["driver"] > 0 and size["peak_rss_mb"]["baseline"] > 0
    row = _table_row(out, "0.3")
    assert _number(row[1]) == pytest.approx(size["ray_tokens_per_s"], abs=1)
    assert row[-1] == "yes"
    assert "(a) Ray actors tok/s" in out and "(b) baseline tok/s" in out
    assert not list(tmp_path.glob("tmp*"))  # the generated corpora are removed
