"""FSDP (``sync.mode: fsdp``) on two real CPU processes (gloo), against DDP in the
same run: the per-worker bytes of parameters, gradients and optimizer state (read from the
tensors each process holds: a DTensor's local shard), the loss curve step by step, the
state_dict keys, and a checkpoint saved through torch.distributed.checkpoint that resumes
onto the uninterrupted curve. Plus the config refusals naming both keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from faults import KillAt
from mlflow.tracking import MlflowClient

from raydrat.bench.loopback import free_port
from raydrat.bench.memory import measurable
from raydrat.cli import main
from raydrat.config import ConfigError, RaydratConfig, load_config
from raydrat.core import metrics as M
from raydrat.core.checkpoint import state as S
from raydrat.core.checkpoint.state import resumable_batches
from raydrat.core.fit import Callback, FitState, fit
from raydrat.core.memory.estimate import estimate_memory
from raydrat.core.model.build import build_model
from raydrat.core.runtime import resolve
from raydrat.core.setup import build_fit_state
from raydrat.core.step import split_block
from raydrat.core.techniques.base import unwrap
from raydrat.core.techniques.sync.fsdp import DCP_DIR, worker_state_bytes
from raydrat.ray_train.trainer import run_training
from raydrat.tune import admission as A
from raydrat.tune.space import expand, load_space

STEPS, SAVE_AT, WORLD = 6, 3, 2


def _cfg(mode: str) -> RaydratConfig:
    return load_config(
        "debug",
        [
            f"sync.mode={mode}",
            f"scaling.num_workers={WORLD}",
            f"train.steps={STEPS}",
            f"train.eval_every={SAVE_AT}",
            "train.log_every=1",
            "train.eval_batches=1",
            "train.grad_accum=2",
            "optim.warmup_steps=1",
        ],
    )


class Record(Callback):
    """Every step's loss; a checkpoint at ``save_at`` into ``directory`` (every rank)."""

    def __init__(self, directory: str | None, save_at: int, config: dict):
        self.losses: dict[int, float] = {}
        self.directory, self.save_at, self.config = directory, save_at, config

    def on_log(self, state: FitState, values: dict[str, float]) -> None:
        self.losses[state.step] = values[M.TRAIN_LOSS]

    def on_save(self, state: FitState, report: dict) -> None:
        if self.directory and state.step == self.save_at:
            S.save_checkpoint(
                self.directory,
                state.model,
                state.optimizer,
                state.step,
                self.config,
                state.techniques,
                state.position,
                state.rank,
                world_size=WORLD,
            )
            dist.barrier()


def _build(cfg: RaydratConfig, rank: int) -> tuple[FitState, list[str]]:
    """Rank ``rank``'s state as a Ray Train worker builds it, and the plain model's keys."""
    state = build_fit_state(cfg, resolve(cfg, gpus=0), torch.device("cpu"), rank, WORLD)
    return state, list(build_model(cfg.model).state_dict())


def _data(cfg: RaydratConfig, rank: int):
    g = torch.Generator().manual_seed(0)
    mc, tc = cfg.model, cfg.train
    blocks = torch.randint(
        0, mc.vocab_size, (WORLD * STEPS * tc.grad_accum, tc.batch_size, mc.seq_len + 1), generator=g
    )
    return list(blocks[rank::WORLD]), [torch.randint(0, mc.vocab_size, (tc.batch_size, mc.seq_len + 1), generator=g)]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for mode in ("ddp", "fsdp"):
        cfg = _cfg(mode)
        train, val = _data(cfg, rank)
        ckpt = os.path.join(out, f"ckpt-{mode}")
        state, keys = _build(cfg, rank)
        record = Record(ckpt, SAVE_AT, cfg.to_dict())
        fit(state, resumable_batches(lambda train=train: iter(train), state.position), lambda val=val: val, [record])
        # the gradients as they stand after a backward (the step's zero_grad frees them)
        idx, targets = split_block(train[0])
        state.model(idx, targets)[1].backward()
        held = worker_state_bytes(state.model, state.optimizer)
        same_keys = list(unwrap(state.model).state_dict()) == keys
        # resume from the step-SAVE_AT checkpoint in a fresh model, optimizer and techniques
        resumed, _ = _build(cfg, rank)
        saved = S.load_state(ckpt)
        resumed.start_step = S.restore(
            resumed.model,
            resumed.optimizer,
            saved,
            S.load_rank_state(ckpt, rank),
            resumed.techniques,
            resumed.position,
            directory=ckpt,
        )
        again = Record(None, 0, {})
        fit(resumed, resumable_batches(lambda train=train: iter(train), resumed.position), lambda val=val: val, [again])
        results[mode] = {
            "losses": record.losses,
            "resumed": again.losses,
            "held": held,
            "keys": same_keys,
            "start": resumed.start_step,
            "sharded": bool(saved.get("sharded")),
            "dcp": sorted(os.listdir(os.path.join(ckpt, DCP_DIR))) if saved.get("sharded") else [],
            "complete": S.verify_checkpoint(ckpt),
            "listed": _listed(ckpt, rank),
        }
        if saved.get("sharded"):  # a shard cut short: the checkpoint does not count as complete
            dist.barrier()
            if rank == 0:
                shard = os.path.join(ckpt, DCP_DIR, "__1_0.distcp")
                with open(shard, "r+b") as f:
                    f.truncate(os.path.getsize(shard) // 2)
            dist.barrier()
            results[mode]["truncated"] = S.verify_checkpoint(ckpt)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _listed(directory: str, rank: int) -> list[str]:
    """The files this rank's manifest lists."""
    with open(os.path.join(directory, S.MANIFEST_FILE.format(rank=rank))) as f:
        return sorted(json.load(f)["files"])


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD)
    runs = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, r in enumerate(runs):  # shown with pytest -rP: the FSDP memory rows
        for part in ("params", "grads", "optimizer"):
            ddp, fsdp = r["ddp"]["held"][part], r["fsdp"]["held"][part]
            print(f"rank {rank} {part}: ddp {ddp:,} B, fsdp {fsdp:,} B, ratio {fsdp / ddp:.3f}")
    return runs


def test_fsdp_holds_about_half_of_ddp_per_worker(fsdp_runs):
    for rank, runs in enumerate(fsdp_runs):
        ddp, fsdp = runs["ddp"]["held"], runs["fsdp"]["held"]
        for part in ("params", "grads", "optimizer"):
            assert ddp[part] > 0
            assert fsdp[part] <= 0.55 * ddp[part], (rank, part, fsdp[part], ddp[part])
    # the two shards add up to the whole model (padding aside)
    total = sum(r["fsdp"]["held"]["params"] for r in fsdp_runs)
    assert fsdp_runs[0]["ddp"]["held"]["params"] <= total <= 1.02 * fsdp_runs[0]["ddp"]["held"]["params"]


def test_fsdp_loss_curve_equals_ddp(fsdp_runs):
    ddp, fsdp = fsdp_runs[0]["ddp"]["losses"], fsdp_runs[0]["fsdp"]["losses"]
    assert sorted(fsdp) == list(range(1, STEPS + 1))
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-4, abs=1e-5), step
    assert ddp[STEPS] < ddp[1]  # it trains


def test_fsdp_keeps_state_dict_keys_and_resumes_from_dcp(fsdp_runs):
    for rank, runs in enumerate(fsdp_runs):
        run = runs["fsdp"]
        assert run["keys"]
        assert run["sharded"] and run["start"] == SAVE_AT
        assert ".metadata" in run["dcp"] and {f"__{r}_0.distcp" for r in range(WORLD)} <= set(run["dcp"])
        # each rank's manifest lists its own shard (rank 0 also the metadata): a cut shard is caught
        own = {f"{DCP_DIR}/__{rank}_0.distcp"} | ({f"{DCP_DIR}/.metadata", "state.pt"} if rank == 0 else set())
        assert set(run["listed"]) == own | {f"rank{rank}.pt", f"data-rank{rank}.json"}, run["listed"]
        assert run["complete"] is None and runs["ddp"]["complete"] is None
        assert run["truncated"] and "__1_0.distcp" in run["truncated"], run["truncated"]
        for step, loss in run["resumed"].items():
            assert loss == pytest.approx(run["losses"][step], rel=1e-5), (rank, step)
        assert sorted(run["resumed"]) == list(range(SAVE_AT + 1, STEPS + 1))


def test_estimate_divides_training_state_and_the_sweep_admits_accordingly(tmp_path):
    base = ["scaling.num_workers=4", "train.batch_size=1", "train.grad_accum=1"]
    rep, fs = load_config("gpt2-small", base), load_config("gpt2-small", [*base, "sync.mode=fsdp"])
    a, b = estimate_memory(rep), estimate_memory(fs)
    buffers = b.detail["fsdp"]["replicated_buffers"]  # each worker keeps every buffer
    whole = {
        "params": a.components["params"] - buffers,
        "grads": a.detail["grads_bytes"],
        "optimizer": a.components["optimizer"],
    }
    for part in ("params", "grads", "optimizer"):
        assert b.detail["fsdp"]["sharded"][part] == pytest.approx(
            whole[part] / 4 + (part == "params") * buffers, rel=1e-3
        )
    assert b.components["params"] < a.components["params"] and b.components["optimizer"] < a.components["optimizer"]
    assert all(b.phases[k] < a.phases[k] for k in a.phases), (a.phases, b.phases)
    assert b.total_bytes < a.total_bytes and max(b.phases.values()) == b.total_bytes
    # micro-batches before the last accumulate unsharded gradients (no reduce-scatter)
    acc = estimate_memory(load_config("gpt2-small", [*base[:2], "train.grad_accum=4", "sync.mode=fsdp"]))
    assert acc.phases["forward"] - b.phases["forward"] == a.detail["grads_bytes"]
    budget_gb = (a.total_bytes + b.total_bytes) / 2 / 2**30
    space = tmp_path / "fsdp.yaml"
    space.write_text(
        f"name: fsdp-admission\nbase: gpt2-small\noverrides: {{scaling.num_workers: 4, train.batch_size: 1, train.grad_accum: 1}}\n"
        f"space:\n  sync.mode: {{grid: [ddp, fsdp]}}\nmetric: val_loss\nmode: min\n"
        f"num_samples: 1\nmemory_budget_gb: {budget_gb:.4f}\n"
    )
    sp = load_space(space)
    trials = expand(sp)
    verdicts = A.screen_drawn(sp, trials, 0)
    assert [v.spec.config.sync.mode for v in verdicts] == ["ddp", "fsdp"]
    assert [v.estimate for v in verdicts] == [a.total_bytes, b.total_bytes]
    assert [v.refused for v in verdicts] == ["infeasible", None], [v.reason for v in verdicts]


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["sync.sync_steps=4"], ["sync.mode=fsdp", "sync.sync_steps", "sync.mode=local"]),
        (["sync.bucket_cap_mb=10"], ["sync.mode=fsdp", "sync.bucket_cap_mb"]),
        (["slots.mode=layerdrop"], ["sync.mode=fsdp", "slots.mode=layerdrop"]),
        (["compile.mode=default"], ["sync.mode=fsdp", "compile.mode=default"]),
        (["optim.name=adamw8bit"], ["sync.mode=fsdp", "optim.name=adamw8bit"]),
        (["precision.mode=fp16"], ["sync.mode=fsdp", "precision.mode=fp16"]),
        (["precision.fallback=bf16"], ["sync.mode=fsdp", "precision.fallback=bf16"]),
        (["train.auto_microbatch=true"], ["sync.mode=fsdp", "train.auto_microbatch=true"]),
    ],
)
def test_fsdp_refuses_what_it_cannot_honour(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config("debug", ["sync.mode=fsdp", *overrides])
    for key in keys:
        assert key in str(err.value)


# -- through Ray Train: a killed FSDP run resumed with --resume replays its steps exactly ----


@pytest.mark.slow
def test_fsdp_run_through_ray_train_resumes_from_its_sharded_checkpoint(ray_local, demo_dir: Path, tmp_path):
    """Two Ray Train workers (gloo): an FSDP run whose rank 1 is killed after step 5 is
    resumed (``--resume``) from its step-4 DCP checkpoint; the step logged both before the
    kill and after the resume has the same loss, and every save is complete."""
    db = tmp_path / "mlruns.db"
    fsdp = load_config(
        "debug",
        [
            f"data.demo_dir={demo_dir}",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.steps=6",
            "train.eval_every=4",
            "train.log_every=1",
            "optim.warmup_steps=2",
            "train.eval_batches=1",
            f"tracking.tracking_uri=sqlite:///{db}",
            "scaling.cpus_per_worker=0.5",
            "scaling.num_workers=2",
            "sync.mode=fsdp",
            "name=fsdp",
        ],
    )
    with pytest.raises(Exception):  # noqa: B017 (the killed worker surfaces as Ray Train's error)
        run_training(fsdp, fit_callbacks=[KillAt(5, rank=1)])
    resumed = run_training(fsdp, resume_run=True)
    assert resumed.steps == 6
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert {m.step: m.value for m in client.get_metric_history(resumed.mlflow_run_id, M.RESUMED_FROM_STEP)} == {4: 4}
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(resumed.mlflow_run_id, M.TRAIN_LOSS):
        losses.setdefault(m.step, []).append(m.value)
    assert sorted(losses) == list(range(1, 7))
    assert len(losses[5]) == 2, losses  # step 5 ran before the kill and again after the resume
    assert losses[5][0] == pytest.approx(losses[5][1], rel=1e-5)
    saves = sorted(p for p in (tmp_path / "runs" / resumed.run_name).glob("checkpoint_*") if p.is_dir())
    assert len(saves) >= 2 and all((p / DCP_DIR / ".metadata").exists() for p in saves)
    assert all(S.verify_checkpoint(p) is None for p in saves), [S.verify_checkpoint(p) for p in saves]


def test_estimate_cli_shows_the_sharding_and_measure_refuses_fsdp(capsys):
    fs = ["--set", "sync.mode=fsdp", "--set", "scaling.num_workers=4", "--set", "train.batch_size=1"]
    assert main(["estimate", "gpt2-small", *fs]) == 0
    out = capsys.readouterr().out
    est = estimate_memory(load_config("gpt2-small", [s for s in fs if s != "--set"]))
    line = next(ln for ln in out.splitlines() if ln.startswith("sync.mode=fsdp over 4 workers"))
    assert f"({est.detail['fsdp']['sharded']['optimizer'] / 2**20:.2f})" in line
    assert "accumulate whole, unsharded gradients" in line  # gpt2-small accumulates 8 micro-batches
    with pytest.raises(ConfigError, match=r"--measure with sync.mode=fsdp .*sync.mode=ddp"):
        measurable(load_config("gpt2-small", [s for s in fs if s != "--set"]))
