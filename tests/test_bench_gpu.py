"""``raydrat bench gpu`` checked on CPU: it imports without what the GPU machine lacks, its
plan's FLOPs agree with PyTorch's FLOP counter, every case runs at toy shapes, and bad input
(no GPU, a missing carried wheel) gets one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from raydrat.bench.gpu import Bench, describe, main
from raydrat.core.model.build import build_model

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("ray", "mlflow", "boto3", "moto", "optuna", "hyperopt")
RUN_WITHOUT = """
import importlib.abc, runpy, sys
absent = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in absent:
            raise ImportError(f"{name} is not on this machine")
sys.meta_path.insert(0, Absent())
sys.argv = ["raydrat.bench.gpu", *sys.argv[2:]]
runpy.run_module("raydrat.bench.gpu", run_name="__main__")
"""


def bench_without(absent: tuple[str, ...], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m raydrat.bench.gpu ARGS`` in a process where ``absent`` cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, ",".join(absent), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.slow
def test_dry_run_plans_gpt2_small_and_the_largest_model_without_ray_mlflow_or_bitsandbytes(tmp_path):
    proc = bench_without((*ABSENT_ON_GPU_MACHINE, "bitsandbytes"), "--dry-run", "--json", str(tmp_path / "plan.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    (thr,) = [r for r in rows if r["case"] == "throughput"]
    assert (thr["n_layer"], thr["d_model"], thr["seq_len"]) == (12, 768, 1024) and 120e6 < thr["params"] < 130e6
    assert len([r for r in rows if r["case"] == "memory"]) >= 6
    ladder = [r for r in rows if r["case"] == "largest"]
    budget = 20 * 2**30
    (chosen,) = [r for r in ladder if r["chosen"]]
    assert chosen["estimated_peak_bytes"] <= budget
    assert all(r["params"] <= chosen["params"] for r in ladder if r["estimated_peak_bytes"] <= budget)
    assert any(r["params"] > chosen["params"] for r in ladder), "the ladder reaches past the budget"
    assert "largest that fits" in proc.stdout and "gpt2-small" in proc.stdout


@pytest.mark.parametrize("shape", [[], ["model.seq_len=256", "model.d_model=128", "model.bias=false"]])
def test_flops_per_token_agree_with_torch_flop_counter(shape):
    """``6 N + 12 L d T`` against the FLOPs PyTorch counts in one forward and backward (the math
    kernel, whose matmuls the counter sees); the gap is norm and bias parameters."""
    cfg = Bench(tiny=True, device="cpu").cfg("model.attention_backend=math", *shape)
    planned = describe(cfg)["flops_per_token"]
    model = build_model(cfg.model, seed=0, device=torch.device("cpu"))
    T = cfg.model.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (1, T + 1))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
    assert counter.get_total_flops() / T == pytest.approx(planned, rel=0.015)


@pytest.mark.slow
def test_every_case_runs_at_toy_shapes_on_cpu_and_its_figures_hold(tmp_path):
    """The code that runs on the GPU, here on CPU at toy shapes (bitsandbytes' CPU 8-bit path)."""
    out = tmp_path / "out"
    proc = bench_without(ABSENT_ON_GPU_MACHINE, "--tiny", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "bench-gpu.json").read_text())
    assert (out / "bench-gpu.log").read_text().strip().endswith("s")  # "bench gpu done in Ns"
    rows = doc["rows"]
    assert {r["case"] for r in rows} == {
        "sdpa",
        "throughput",
        "memory",
        "precision",
        "optim8bit",
        "recompute",
        "layerdrop",
        "largest",
    }
    assert not [r for r in rows if "failed" in r], [r for r in rows if "failed" in r]
    assert doc["environment"]["torch"] == torch.__version__
    sdpa = {r["backend"]: r for r in rows if r["case"] == "sdpa"}
    assert sdpa["math"]["engaged"] and not sdpa["efficient"]["engaged"]  # no CPU kernel for efficient
    memory = [r for r in rows if r["case"] == "memory" and "error" in r]
    assert len(memory) >= 6 and all(abs(r["error"]) <= 0.10 for r in memory), memory
    thr = {r["model"]: r for r in rows if r["case"] == "throughput"}
    assert thr["raydrat"]["tokens_per_s"] > 0 and thr["raydrat"]["ratio_to_reference"] > 0
    prec = {r["precision"]: r for r in rows if r["case"] == "precision"}
    assert abs(prec["bf16"]["val_loss_vs_fp32"]) < 0.02 and "skipped" in prec["fp16"]
    assert prec["fp32"]["val_loss"] < prec["fp32"]["first_train_loss"]  # the stream is learnable
    o8 = {r["optim"]: r for r in rows if r["case"] == "optim8bit"}
    assert 0 < o8["adamw8bit"]["state_ratio"] < 1
    rec = {r["variant"]: r for r in rows if r["case"] == "recompute"}
    assert rec["full"]["saved_ratio"] < 1 and rec["full"]["peak_bytes"] < rec["none"]["peak_bytes"]
    (chosen,) = [r for r in rows if r["case"] == "largest" and r.get("chosen")]
    assert chosen["measured_within_budget"] and abs(chosen["error"]) <= 0.10


def test_without_a_gpu_one_line_points_to_dry_run(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydrat: error:") and "\n" not in err and "--dry-run" in err


def test_past_the_deadline_each_case_is_recorded_as_skipped(tmp_path):
    assert main(["--tiny", "--device", "cpu", "--deadline-s", "0", "--json", str(tmp_path / "g.json")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["skipped"].startswith("time") for r in rows)


def test_gpu_check_names_a_missing_carried_wheel(tmp_path):
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    for name in (
        "pydantic-2.0-py3-none-any.whl",
        "annotated_types-0.7-py3-none-any.whl",
        "typing_extensions-4.0-py3-none-any.whl",
        "typing_inspection-0.4-py3-none-any.whl",
    ):
        (carry / "wheels" / name).write_bytes(b"")
    env = {**os.environ, "CARRY": str(carry), "SITE": str(tmp_path / "site")}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu-check"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("raydrat: error: gpu-check: carried wheel missing")
        and "pydantic_core" in proc.stderr
        and "gpu-carry" in proc.stderr
    )
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())  # nothing installed
