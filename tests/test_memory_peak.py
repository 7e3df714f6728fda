"""The peak PyTorch's allocator holds over training steps (``peak_bytes``), and the
estimate against it."""

from __future__ import annotations

import time

import pytest
import torch

from raydrat.bench.local import LocalData, LocalRun, interleave
from raydrat.bench.memory import measure
from raydrat.config import load_config
from raydrat.core import metrics as M
from raydrat.core.memory.peak import SESSION, PeakMemory

MiB = 2**20
SMALL = ["train.device=cpu", "tracking.enabled=false", "scaling.cpus_per_worker=1"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_cpu_peak_sees_the_allocations_of_the_step_and_of_the_build():
    """The instrument itself, on allocations of known size: persistent bytes from the
    build region, the step's rise above its start, a free inside the step."""
    peak = PeakMemory(torch.device("cpu"), first_steps=1)
    with peak.region("build"):
        kept = torch.ones(MiB // 4)  # 1 MiB that stays
    with peak.step(0):
        a = torch.ones(3 * MiB // 4)  # +3 MiB
        b = torch.ones(2 * MiB // 4)  # +2 MiB: the peak, 1 + 3 + 2
        del a, b
    assert not SESSION.running  # its one sampled step done: the profiler is off
    assert peak.region_bytes["build"] == MiB
    assert peak.steps[0].persistent == MiB
    assert peak.peak() == 6 * MiB
    assert kept.sum() == MiB // 4


# three small configurations whose peaks sit in different phases: the loss's backward
# (debug), a recomputed MLP branch's backward (wide model, small vocabulary), and the loss's
# backward of a later micro-batch with every gradient allocated (bf16, accumulation, 8-bit)
CONFIGS = {
    "debug": [],
    "full_recompute_wide": ["model.d_model=128", "model.seq_len=128", "train.batch_size=4", "recompute.mode=full"],
    "bf16_accum_8bit": ["precision.mode=bf16", "train.grad_accum=2", "optim.name=adamw8bit", "train.batch_size=4"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_allocator_peak_within_10_percent_of_the_estimate(name):
    pytest.importorskip("bitsandbytes") if "8bit" in name else None
    m = measure(load_config("debug", [*SMALL, *CONFIGS[name]]), steps=3)
    measured, estimated = m.worst.peak, m.step_estimate.total_bytes
    assert abs(estimated - measured) <= 0.10 * measured, (
        name,
        estimated,
        measured,
        m.step_estimate.detail["peak_phase"],
    )
    assert m.worst_case.total_bytes == estimated  # deterministic plans: the config's estimate is that step's
    # the measured components the estimate is made of
    for key in ("params", "optimizer", "grads", "saved_activations"):
        assert abs(m.estimated[key] - m.measured[key]) <= 0.10 * m.measured[key], (
            key,
            m.estimated[key],
            m.measured[key],
        )
    if name == "full_recompute_wide":
        assert m.step_estimate.detail["peak_phase"].startswith("layers backward")


def test_interleaved_runs_each_get_their_own_peak():
    """Two runs stepped in turn in one process (one shared profiler session) measure what
    each measures alone: each counts only the bytes of its own regions."""
    small = load_config("debug", [*SMALL, "train.steps=3", "optim.warmup_steps=1", "train.eval_batches=1"])
    big = load_config(
        "debug",
        [
            *SMALL,
            "train.steps=3",
            "optim.warmup_steps=1",
            "train.eval_batches=1",
            "model.d_model=128",
            "model.n_layer=3",
        ],
    )
    alone = {}
    for name, cfg in (("small", small), ("big", big)):
        alone[name] = LocalRun.start(cfg, LocalData.random(cfg, 3)).run().peak.peak()
    runs = {name: LocalRun.start(cfg, LocalData.random(cfg, 3)) for name, cfg in (("small", small), ("big", big))}
    interleave(list(runs.values()))
    for name, run in runs.items():
        assert abs(run.peak.peak() - alone[name]) <= 0.01 * alone[name], (name, run.peak.peak(), alone[name])
        assert run.profiled[:2] == [True, True] and run.profiled[2] is False
        assert run.timed_steps() == [2]
    assert alone["big"] > 2 * alone["small"]


def test_every_fit_report_has_the_peak_in_mib_and_no_heap_figure():
    cfg = load_config("debug", [*SMALL, "train.steps=3", "optim.warmup_steps=1", "train.eval_batches=1"])
    run = LocalRun.start(cfg, LocalData.random(cfg, 3)).run()
    report = run.state.last_report
    assert report[M.PEAK_MIB] * M.MIB == run.peak.peak() > run.runtime.estimate.components["params"]
    assert not [k for k in report if "heap" in k or k.endswith("_bytes")], report


def test_profiled_steps_are_left_out_of_throughput():
    thr = M.Throughput(total_steps=4, tokens_per_step=100)
    thr.step_done()  # the first: warm-up
    time.sleep(0.2)
    thr.step_done(timed=False)  # slow, profiled: left out
    time.sleep(0.05)
    thr.step_done()
    rate = thr.steady_rate()
    assert 100 / 0.09 < rate < 100 / 0.05  # one step of 100 tokens in ~0.05 s, not 2 in 0.25 s
