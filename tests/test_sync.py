"""Sync strategies. On two real Ray Train CPU workers (gloo), one worker group for all
variants: replicas agree after a sync, local/1 + SGD equals DDP, bytes counted match the
parameter bytes / sync_steps, streaming fragments cut the bytes of one step, int8 sends
about a quarter of fp32; on the demo model, DiLoCo at its defaults and streaming int8 end
within 3% of DDP's val loss at equal tokens (slow). Without Ray: the int8/bf16 exchange on
two gloo processes against the fp32 mean, the fragments' partition, and config errors."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydrat.bench.loopback import free_port
from raydrat.config import ConfigError, load_config
from raydrat.config.sync import SyncConfig
from raydrat.core.data.demo import build_demo_corpus
from raydrat.core.model.build import build_model
from raydrat.core.techniques.sync.build import build_strategy
from raydrat.core.techniques.sync.codec import dequantize, exchange_mean, quantize
from raydrat.core.techniques.sync.ddp import DDPStrategy
from raydrat.core.techniques.sync.fragments import split_fragments
from raydrat.core.techniques.sync.fsdp import FSDPStrategy
from raydrat.core.techniques.sync.local import LocalStrategy
from raydrat.core.techniques.sync.strategy import SyncStrategy, model_checksum

BLOCK = 256


@pytest.fixture(scope="module")
def sync_rows(ray_local, demo_dir: Path, tmp_path_factory):
    from raydrat.bench.sync import run_sync_workers

    tmp = tmp_path_factory.mktemp("sync")
    cfg = load_config(
        "debug",
        [
            f"data.demo_dir={demo_dir}",
            f"train.storage_path={tmp}",
            "train.steps=8",
            "optim.warmup_steps=2",
            "optim.name=sgd",
            "optim.lr=0.5",
            "optim.grad_clip=0",
            "train.eval_batches=1",
            "scaling.cpus_per_worker=0.5",
        ],
    )
    variants = [
        {"mode": "ddp", "sync_steps": 1},
        {"mode": "local", "sync_steps": 1},
        {"mode": "local", "sync_steps": 4},
        {"mode": "local", "sync_steps": 2, "outer_optimizer": "nesterov", "average_optimizer_state": True},
        {
            "mode": "local",
            "sync_steps": 4,
            "outer_optimizer": "nesterov",
            "fragments": 2,
            "delay": 1,
            "quantization": "int8",
        },
        {"mode": "local", "sync_steps": 4, "fragments": 2, "quantization": "bf16"},
    ]
    rows = run_sync_workers(cfg, variants, workers=2)
    return {r["label"]: r for r in rows}


@pytest.mark.slow
def test_replicas_identical_after_sync(sync_rows):
    assert set(sync_rows) == {"ddp", "local/1", "local/4", "diloco/2", "stream-int8/4", "stream-avg-bf16/4"}
    for label, row in sync_rows.items():
        a, b = row["checksums"]
        assert a == b, f"{label}: ranks disagree after the final sync ({a} vs {b})"


@pytest.mark.slow
def test_local_one_step_sgd_equals_ddp(sync_rows):
    ddp, local = sync_rows["ddp"]["checksums"][0], sync_rows["local/1"]["checksums"][0]
    assert local == pytest.approx(ddp, rel=1e-5)
    # ... while more local steps really do train differently
    assert sync_rows["local/4"]["checksums"][0] != pytest.approx(ddp, rel=1e-5)
    assert sync_rows["local/1"]["val_loss"] == pytest.approx(sync_rows["ddp"]["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_bytes_match_parameter_bytes_over_sync_steps(sync_rows):
    pbytes = sync_rows["ddp"]["param_bytes"]
    # 2 workers: a ring all-reduce sends 2(W-1)/W = 1 x the payload per worker
    assert sync_rows["ddp"]["bytes_per_step"] == pbytes
    assert sync_rows["local/1"]["bytes_per_step"] == pbytes
    assert sync_rows["local/4"]["bytes_per_step"] == pbytes / 4
    for row in sync_rows.values():
        assert 0 < row["comm_fraction"] < 1
        assert row["tokens_per_s"] > 0


@pytest.mark.slow
def test_streaming_int8_sends_a_quarter_and_fragments_cut_the_peak(sync_rows):
    ddp, n = sync_rows["ddp"]["bytes_per_step"], sync_rows["ddp"]["param_bytes"] // 4
    H, F = 4, 2
    scales = 4 * n / BLOCK  # one fp32 scale per block, per full exchange
    for label, per_value in (("stream-int8/4", 1), ("stream-avg-bf16/4", 2)):
        row = sync_rows[label]
        full = n * per_value + (scales if per_value == 1 else 0)  # one exchange of the whole model
        # scheduled syncs: each fragment once every H steps; padding adds < 2 W values per exchange
        assert full / H <= row["sched_bytes_per_step"] <= (full + 2 * 2 * F * (per_value + 4)) / H
        assert row["peak_step_bytes"] <= 0.55 * full  # one fragment per step, about 1/F of the model
        # the flush before the final evaluation syncs both fragments once more
        assert row["bytes_per_step"] > row["sched_bytes_per_step"]
    assert sync_rows["stream-int8/4"]["sched_bytes_per_step"] <= ddp / (4 * H) + (scales + 2 * 2 * F * 5) / H
    assert sync_rows["local/4"]["peak_step_bytes"] == 4 * n  # one fragment: the whole model at once


# -- DiLoCo and streaming DiLoCo converge at their defaults (demo model) ---------------


@pytest.fixture(scope="module")
def demo_rows(ray_local, demo_dir: Path, tmp_path_factory):
    from raydrat.bench.sync import run_sync_workers, streaming_variant

    build_demo_corpus(demo_dir, 4096)  # the demo recipe's tokenizer beside the debug one
    cfg = load_config(
        "demo", [f"data.demo_dir={demo_dir}", f"train.storage_path={tmp_path_factory.mktemp('demo')}", *DEMO_SETTINGS]
    )
    variants = [
        {"mode": "ddp", "sync_steps": 1},
        {"mode": "local", "sync_steps": 4, "outer_optimizer": "nesterov"},
        {"mode": "local", "sync_steps": 16, "outer_optimizer": "nesterov"},
        streaming_variant(16, cfg.model.n_layer),
    ]
    rows = {r["label"]: r for r in run_sync_workers(cfg, variants, workers=2)}
    for label, r in rows.items():  # shown with pytest -rP
        print(
            f"{label}: val {r['val_loss']:.4f}, {r['bytes_per_step']:,.0f} bytes/step "
            f"({r['sched_bytes_per_step']:,.0f} scheduled), {r['tokens_per_s']:,.0f} tokens/s"
        )
    return rows


DEMO_SETTINGS = [
    "train.steps=96",
    "train.batch_size=4",
    "optim.warmup_steps=10",
    "train.eval_batches=4",
    "scaling.cpus_per_worker=1",
]


@pytest.mark.slow
def test_diloco_and_streaming_int8_end_within_3_percent_of_ddp(demo_rows):
    ddp = demo_rows["ddp"]["val_loss"]
    assert ddp < math.log(4096) - 1.0  # DDP itself trained well below the untrained ln V
    for label in ("diloco/4", "diloco/16", "stream-int8/16"):
        row = demo_rows[label]
        assert row["val_loss"] <= 1.03 * ddp, f"{label}: val {row['val_loss']:.4f} vs ddp {ddp:.4f}"
    int8 = demo_rows["stream-int8/16"]
    n = demo_rows["ddp"]["param_bytes"] // 4
    assert int8["sched_bytes_per_step"] <= demo_rows["ddp"]["bytes_per_step"] / (4 * 16) + (4 * n / BLOCK + 100) / 16


# -- the exchange itself, on two gloo processes (no Ray) -----------------------------


def _exchange_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(10_007, generator=g) * torch.logspace(-3, 1, 10_007)  # scales spanning 4 decades
    x[:300] = 0.0  # an all-zero block
    results = {"x": x}
    for quant in ("none", "bf16", "int8"):
        mean, sent = exchange_mean(x.clone(), quant, BLOCK)
        results[quant] = (mean, sent)
    torch.save(results, os.path.join(out, f"x{rank}.pt"))
    dist.destroy_process_group()


def test_quantized_exchange_matches_the_fp32_mean_and_agrees_across_ranks(tmp_path):
    mp.spawn(_exchange_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"x{r}.pt") for r in (0, 1))
    true = (r0["x"].double() + r1["x"].double()) / 2
    n = true.numel()
    for quant in ("none", "bf16", "int8"):
        (a, sent_a), (b, sent_b) = r0[quant], r1[quant]
        assert torch.equal(a, b), quant  # every rank applies the same bytes
        assert sent_a == sent_b
    assert torch.allclose(r0["none"][0].double(), true, rtol=1e-6, atol=1e-7)
    assert r0["none"][1] == 4 * n
    # bf16: 8 mantissa bits, rounded twice (each input, then the mean)
    assert torch.all((r0["bf16"][0].double() - true).abs() <= 2 * 2**-8 * (r0["x"].abs() + r1["x"].abs() + true.abs()))
    assert r0["bf16"][1] == 2 * 2 * math.ceil(n / 2)
    # int8: per element at most half a step of each input's block scale plus of the mean's
    m = math.ceil(n / 2)
    err = (r0["int8"][0].double() - true).abs()
    for chunk in range(2):
        for start in range(0, m, BLOCK):
            lo, hi = chunk * m + start, min(chunk * m + start + BLOCK, (chunk + 1) * m, n)
            if lo >= n:
                continue
            step = (r0["x"][lo:hi].abs().max() + r1["x"][lo:hi].abs().max()) / 2 / 127 / 2 + true[
                lo:hi
            ].abs().max() / 127 / 2
            assert err[lo:hi].max() <= step * 1.001 + 1e-12, (lo, hi)
    assert err[:300].max() == 0  # a zero block stays exactly zero
    scales = 2 * math.ceil(m / BLOCK) * 4
    assert r0["int8"][1] == 2 * m + scales  # all-to-all half + all-gather half, scales included


LINK_S, COMPUTE_S = 0.3, 0.6  # the simulated link's wait per exchange; one step's "compute"


def _overlap_worker(rank: int, port: int, out: str) -> None:
    """Four local steps of "compute" (a sleep and a rank-dependent change of the weights)
    with a sync every 2 steps over a link that takes LINK_S per exchange; the time each
    ``after_optimizer_step`` call blocks the training thread, with and without a delay."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for delay in (0, 1):
        model = build_model(load_config("debug").model, seed=0)
        strategy = build_strategy(SyncConfig(mode="local", sync_steps=2, delay=delay), 2)
        strategy.comm.latency_s = LINK_S
        strategy.apply(model)
        blocked = {}
        for done in range(1, 5):
            time.sleep(COMPUTE_S)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * (rank + 1))
            t0 = time.perf_counter()
            strategy.after_optimizer_step(done)
            blocked[done] = time.perf_counter() - t0
        before = model_checksum(model)
        strategy.synchronize()  # the flush before an evaluation or a checkpoint
        results[delay] = {
            "blocked": blocked,
            "before_flush": before,
            "checksum": model_checksum(model),
            "comm_s": strategy.comm.take()[1],
        }
    torch.save(results, os.path.join(out, f"o{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_delayed_exchange_overlaps_the_next_steps_compute(tmp_path):
    mp.spawn(_overlap_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"o{rank}.pt")
        now, later = r[0]["blocked"], r[1]["blocked"]
        # delay 0: the steps that sync (2 and 4) wait for the link
        assert min(now[2], now[4]) >= LINK_S, now
        # delay 1: launched after steps 1 and 3, landed after 2 and 4: the wait is hidden
        # behind the next step's compute
        assert max(later.values()) < LINK_S / 2, later
        # ... and still happened (time in the exchange, off the training thread)
        assert r[1]["comm_s"] >= 2 * LINK_S
    r0, r1 = (torch.load(tmp_path / f"o{rank}.pt") for rank in (0, 1))
    # delay 0: the replicas agree right after the sync at step 4; delay 1 keeps each rank's
    # progress made while the exchange travelled (sync.overlap_keep=1), so they agree only
    # after the flush
    assert r0[0]["before_flush"] == r1[0]["before_flush"]
    assert r0[1]["before_flush"] != r1[1]["before_flush"]
    for delay in (0, 1):
        assert r0[delay]["checksum"] == r1[delay]["checksum"], delay


def test_quantize_round_trip():
    x = torch.randn(3, 1000)
    q, s = quantize(x, "int8", 64)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (3, math.ceil(1000 / 64))
    assert (dequantize(q, s, 64) - x).abs().max() <= s.max() / 2 + 1e-7
    qb, none = quantize(x, "bf16", 64)
    assert qb.dtype == torch.bfloat16 and none is None


def test_fragments_partition_every_parameter_once_and_evenly():
    cfg = load_config("demo")
    model = build_model(cfg.model, seed=0)
    total = sum(p.numel() for p in model.parameters())
    for F in (1, 2, 4):
        frags = split_fragments(model, F)
        assert sum(f.numel for f in frags) == total
        assert max(f.numel for f in frags) <= 1.01 * total / F  # the peak of one step falls by F
        seen = {}  # every element of every parameter in exactly one fragment
        for f in frags:
            for v in f.views:
                key = v.untyped_storage().data_ptr()
                seen.setdefault(key, []).append((v.storage_offset(), v.numel()))
        for p in model.parameters():
            spans = sorted(seen[p.untyped_storage().data_ptr()])
            assert sum(n for _, n in spans) == p.numel()
            assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
    f4 = split_fragments(model, 4)
    assert next(n for n in f4[1].names if n.startswith("layers.")).startswith("layers.1.")  # strided blocks
    with pytest.raises(ValueError, match="sync.fragments"):
        split_fragments(model, 5)


def test_sync_mode_picks_one_strategy_and_one_worker_trains_plainly():
    for mode, cls in (("ddp", DDPStrategy), ("local", LocalStrategy), ("fsdp", FSDPStrategy)):
        assert type(build_strategy(SyncConfig(mode=mode), 2)) is cls
        assert type(build_strategy(SyncConfig(mode=mode), 1)) is SyncStrategy
    assert not build_strategy(SyncConfig(), 2).cfg.find_unused_parameters
    assert build_strategy(SyncConfig(), 2, skips_layers=True).cfg.find_unused_parameters
    assert [build_strategy(SyncConfig(mode=m), 2).sharded for m in ("ddp", "local", "fsdp")] == [False, False, True]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["sync.mode=local", "sync.sync_steps=0"], ["sync.sync_steps", "greater than or equal to 1"]),
        (["sync.mode=local", "sync.bucket_cap_mb=10"], ["sync.bucket_cap_mb", "sync.mode=ddp"]),
        (["sync.sync_steps=4"], ["sync.sync_steps", "sync.mode=local"]),
        (["sync.mode=allreduce"], ["sync.mode"]),
        (
            ["sync.mode=local", "sync.sync_steps=8", "sync.fragments=4"],
            ["sync.fragments (4)", "model.n_layer", "2 blocks"],
        ),
        (["sync.mode=local", "sync.sync_steps=5", "sync.fragments=2"], ["sync.sync_steps (5)", "sync.fragments (2)"]),
        (["sync.mode=local", "sync.sync_steps=8", "sync.fragments=2", "sync.delay=4"], ["sync.delay (4)", "8/2 = 4"]),
        (["sync.quantization=int8"], ["sync.quantization", "sync.mode=local"]),
        (
            ["sync.mode=local", "sync.sync_steps=4", "sync.fragments=2", "sync.average_optimizer_state=true"],
            ["sync.average_optimizer_state", "sync.fragments"],
        ),
        (["sync.mode=local", "sync.quantization=int4"], ["sync.quantization"]),
        (["sync.mode=fsdp", "sync.fragments=2"], ["sync.fragments", "sync.mode=local, not sync.mode=fsdp"]),
        (["sync.mode=fsdp", "sync.find_unused_parameters=true"], ["sync.find_unused_parameters", "sync.mode=ddp"]),
    ],
)
def test_bad_sync_settings(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config("debug", overrides)
    for needle in needles:
        assert needle in str(err.value)
