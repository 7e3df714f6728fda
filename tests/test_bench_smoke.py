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

from raydrat.bench import rounds as R
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
    monkeypatch.setattr(R, "MIN_ROUNDS", 3)  # the table's shape, not a ratio to trust: 3 rounds, not 5
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
            "train.eval_every=4",
            "--set",
            "train.log_every=4",
            "--steps",
            "8",
            "--from-step",
            "2",
            "--rounds",
            "3",
            "--json",
            str(path),
        ]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    figures = json.loads(path.read_text())
    assert figures["steps"] == 8 and figures["from_step"] == 2 and figures["config"] == "debug"
    assert figures["rounds"] == 3 and len(figures["load_average"]) == 2
    ray_loop, bare_loop = figures["loops"]["Ray Train (1 worker)"], figures["loops"]["bare PyTorch"]
    for loop in (ray_loop, bare_loop):
        assert len(loop["runs"]) == 3  # one run of each loop a round
        for run in loop["runs"]:
            assert run["steps"] == 6 and run["wall_s"] > 0 and run["cpu_s"] > 0  # steps 3 to 8, timed in its process
            assert 0 < run["val_loss"] < math.log(512) + 1  # a debug model (vocab 512) that trained, not diverged
        tps = [r["tokens"] / r["wall_s"] for r in loop["runs"]]
        assert loop["tokens_per_s"]["min"] == pytest.approx(min(tps))
        assert loop["tokens_per_s"]["max"] == pytest.approx(max(tps))
    ratios = [
        r["tokens"] / r["wall_s"] / (b["tokens"] / b["wall_s"]) for r, b in zip(ray_loop["runs"], bare_loop["runs"])
    ]
    assert figures["ratio_range"] == pytest.approx([min(ratios), max(ratios)])
    assert figures["ratio"] == pytest.approx(sorted(ratios)[1])  # the median round
    assert ray_loop["data_wait_before_s"]["median"] > 0  # the stream's start-up, outside the window
    ray_row, bare_row = _table_row(out, "Ray Train (1 worker)"), _table_row(out, "bare PyTorch")
    assert ray_row[1].startswith(f"{figures['ray_tokens_per_s']:,.0f} (")
    assert bare_row[1].startswith(f"{figures['bare_tokens_per_s']:,.0f} (")
    lo, hi = figures["ratio_range"]
    assert f"ratio Ray/bare tokens/s, wall: {figures['ratio']:.3f}x ({lo:.3f}-{hi:.3f})" in out
    assert "measured from the end of step 2" in out and "past both loops' data start-up" in out
    assert (
        f"verdict (wall): {figures['verdict_text']}; (CPU time): {figures['cpu_verdict_text']}" in out
        and "load average" in out
    )
    for r in range(1, 4):
        assert f"round {r}/3" in out
    assert "TrainingReport(" not in out + captured.err  # the quiet console of `raydrat train`
    assert list((tmp_path / "runs").rglob("state.pt"))  # the Ray loop checkpointed as training does


def test_bench_ingest_prints_and_writes_every_pipeline(ray_local, tmp_path: Path, capsys):
    path = tmp_path / "ingest.json"
    rc = main(
        ["bench", "ingest", "debug", "--mb", "0.3", "--huge-mb", "0.5", "--workdir", str(tmp_path), "--json", str(path)]
    )
    out = capsys.readouterr().out
    assert rc == 0
    figures = json.loads(path.read_text())
    assert figures["config"] == "debug" and figures["cpus"] >= 1 and figures["train_tokens_per_s"] > 0
    (size,) = figures["sizes"]
    assert size["corpus_mb"] == 0.3
    # the training stream (every CPU a reader, and one reader) and the baseline packed the very same tokens
    assert size["tokens_match"] is True and size["tokens"] > 0 and size["tokens"] % 65 == 0  # seq_len 64 + 1
    for key in ("stream_tokens_per_s", "stream_one_reader_tokens_per_s", "baseline_tokens_per_s"):
        assert size[key] > 0, key
    assert size["ratio"] == pytest.approx(size["stream_tokens_per_s"] / size["baseline_tokens_per_s"])
    assert size["ingest_over_train"] == pytest.approx(size["stream_tokens_per_s"] / figures["train_tokens_per_s"])
    assert size["peak_rss_mb"]["one_reader"] > 0 and size["peak_rss_mb"]["baseline"] > 0
    row = _table_row(out, "0.3 MB parquet")
    assert _number(row[1]) == pytest.approx(size["stream_tokens_per_s"], abs=1)
    assert row[-1] == "yes"
    assert "(a1) stream, 1 reader tok/s" in out and "(b) baseline tok/s" in out
    # one document of 0.5 MB on one line: read in bounded pieces, its tokens counted
    (huge,) = figures["huge_documents"]
    assert huge["document_mb"] == 0.5 and huge["tokens"] > 0 and huge["peak_rss_reader_mb"] > 0
    assert _table_row(out, "1 document of 0.5 MB, one line")[-1] == f"{huge['tokens']:,} tokens"
    assert not list(tmp_path.glob("tmp*"))  # the generated corpora are removed
