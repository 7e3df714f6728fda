"""Checkpoints and resume through Ray Train: an interrupted run resumed with --resume ends
where an uninterrupted run ends, block for block (the block ids every worker trained on are
recorded); a chain of resumes at 2 -> 1 -> 2 -> 3 workers trains on exactly the global order
of an uninterrupted run; a worker killed mid-run (SIGKILL of its process) is replaced under
max_failures=1 and training continues from the latest checkpoint; every checkpoint's
manifests reached storage after the files they list. Plus the --resume and
cluster-size errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faults import KillAt, StopAt, TraceBlocks, read_traces

from raydrat.cli import main
from raydrat.config import load_config
from raydrat.core.checkpoint.state import MANIFEST_FILE, verify_checkpoint
from raydrat.core.data.position import DataPosition
from raydrat.core.data.stream import WorkerBlocks, local_source
from raydrat.core.techniques.slots import SlotSchedule
from raydrat.ray_train.resume import checkpoint_dirs, choose_checkpoint, write_run_record
from raydrat.ray_train.trainer import run_training

pytestmark = pytest.mark.slow

STEPS, EVAL, SAVE = 10, 5, 3
# Two DDP workers with layer dropping: DDP must accept steps that leave skipped layers without
# gradients, and a resumed run must replay each rank's batches and the slot controller's
# draws (its RNG is in the checkpoint).
LAYERDROP_DDP = ("scaling.num_workers=2", "sync.mode=ddp", "slots.mode=layerdrop", "slots.keep=0.5")


def _cfg(demo_dir: Path, storage: Path, db: Path, *extra: str):
    return load_config(
        "debug",
        [
            f"data.demo_dir={demo_dir}",
            f"train.storage_path={storage}",
            f"train.steps={STEPS}",
            f"train.eval_every={EVAL}",
            "train.log_every=1",
            "optim.warmup_steps=2",
            f"tracking.tracking_uri=sqlite:///{db}",
            "scaling.cpus_per_worker=0.5",
            *extra,
        ],
    )


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _history(db: Path, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in _client(db).get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def runs(ray_local, demo_dir: Path, tmp_path_factory):
    """An interrupted run (worker killed after step 7, no retries) resumed with --resume,
    and the same config uninterrupted; two DDP workers with layer dropping, so each rank must
    replay its own batches (streaming_split under data.preserve_order) and slot plans."""
    tmp = tmp_path_factory.mktemp("resume")
    db = tmp / "mlruns.db"
    # saves every 3 steps too, without evaluation: Ray Train has recorded unscored saves when
    # the run is resumed (Ray Train would write an inf score as null and fail the resumed controller)
    every = f"train.checkpoint_every={SAVE}"
    cfg = _cfg(demo_dir, tmp / "rr", db, "name=resumable", every, *LAYERDROP_DDP)
    with pytest.raises(Exception):  # noqa: B017 (the killed worker surfaces as Ray Train's error)
        run_training(cfg, fit_callbacks=[KillAt(7), TraceBlocks(tmp, "interrupted")])
    resumed = run_training(cfg, resume_run=True, fit_callbacks=[TraceBlocks(tmp, "resumed")])
    plain_cfg = _cfg(demo_dir, tmp / "rr", db, "name=plain", every, *LAYERDROP_DDP)
    plain = run_training(plain_cfg, fit_callbacks=[TraceBlocks(tmp, "plain")])
    return {"tmp": tmp, "db": db, "cfg": cfg, "resumed": resumed, "plain": plain}


def test_resume_continues_same_run_and_curve(runs):
    db, resumed, plain = runs["db"], runs["resumed"], runs["plain"]
    assert resumed.steps == STEPS
    run = _client(db).get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED"
    # one MLflow run holds both halves; the second started from the step-6 save (unevaluated)
    assert _history(db, resumed.mlflow_run_id, "resumed_from_step") == {2 * SAVE: 2 * SAVE}
    cfg = runs["cfg"]  # the plan really drops layers in steps before and after the restart
    slots = SlotSchedule(cfg.slots, cfg.model.n_layer, cfg.train.steps, seed=cfg.train.seed)
    dropped = [step for step in range(STEPS) if len(slots.plan(step)) < cfg.model.n_layer]
    assert min(dropped) < 2 * SAVE <= max(dropped), dropped
    assert _history(db, resumed.mlflow_run_id, "active_slots") == _history(db, plain.mlflow_run_id, "active_slots")
    a = _history(db, resumed.mlflow_run_id, "train_loss")
    b = _history(db, plain.mlflow_run_id, "train_loss")
    assert sorted(a) == list(range(1, STEPS + 1))
    # the same batches on every rank after the restart: the curves agree to float noise
    # (measured bitwise equal on CPU)
    for step in range(1, STEPS + 1):
        assert a[step] == pytest.approx(b[step], rel=1e-3), step
    assert resumed.final_val_loss == pytest.approx(plain.final_val_loss, rel=1e-3)
    record = json.loads((runs["tmp"] / "rr" / resumed.run_name / "raydrat_run.json").read_text())
    assert record["mlflow_run_id"] == resumed.mlflow_run_id and record["state"] == "finished"


def test_every_manifest_reached_storage_after_the_files_it_lists(runs):
    """Ray Train copies a reported directory in no set order (the small manifest first, as
    often as not): each rank's manifest is written into storage once its files are there."""
    saves = [d for name in ("resumed", "plain") for d in checkpoint_dirs(runs["tmp"] / "rr" / runs[name].run_name)]
    assert len(saves) >= 4
    for d in saves:
        assert verify_checkpoint(d) is None
        for manifest in d.glob(MANIFEST_FILE.format(rank="*")):
            files = json.loads(manifest.read_text())["files"]
            latest = max((d / f).stat().st_mtime_ns for f in files)
            assert manifest.stat().st_mtime_ns >= latest, (d.name, manifest.name)


def effective(tmp: Path, legs: list[tuple[str, int, int]]) -> dict[int, tuple[int, int]]:
    """``{global position: (block_id, epoch)}`` of what the run kept: of each leg ``(tag,
    first step, last step)``, the steps a checkpoint kept (a leg's steps after the checkpoint
    the next leg resumed from were trained again there). A position twice fails."""
    out: dict[int, tuple[int, int]] = {}
    for tag, first, last in legs:
        steps = read_traces(tmp, tag)
        assert min(steps) == first, (tag, sorted(steps))
        for step in range(first, last + 1):
            for position, block_id, epoch in steps[step]:
                assert position not in out, f"position {position} trained twice ({tag}, step {step})"
                out[position] = (block_id, epoch)
    return out


def test_the_resumed_run_trains_on_the_uninterrupted_runs_blocks(runs):
    """Killed after step 7, resumed from the step-6 checkpoint: the blocks of steps 1-6 and
    7-10 are those of the plain run, position for position, and no block is in flight."""
    tmp = runs["tmp"]
    kept = effective(tmp, [("interrupted", 1, 2 * SAVE), ("resumed", 2 * SAVE + 1, STEPS)])
    plain = effective(tmp, [("plain", 1, STEPS)])
    assert len(plain) == STEPS * 8 * 2 and kept == plain


CHAIN_STEPS = 12
CHAIN = [(2, 3), (1, 5), (2, 7), (3, None)]
"""Legs of one run: (workers, the step after which a worker is killed); checkpoints every 2
steps, so the legs resume from steps 2, 4 and 6: 2 -> 1, 1 -> 2 and 2 -> 3 workers."""


@pytest.fixture(scope="module")
def chain(ray_local, demo_dir: Path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    db = tmp / "mlruns.db"
    base = (f"train.steps={CHAIN_STEPS}", "train.eval_every=6", "train.checkpoint_every=2", "sync.mode=ddp")

    def cfg(name: str, workers: int):
        return _cfg(demo_dir, tmp / "rr", db, f"name={name}", f"scaling.num_workers={workers}", *base)

    for leg, (workers, stop) in enumerate(CHAIN):
        callbacks = [TraceBlocks(tmp, f"leg{leg}"), *([StopAt(stop)] if stop else [])]
        if stop:
            with pytest.raises(Exception):  # noqa: B017 (the killed worker surfaces as Ray Train's error)
                run_training(cfg("chain", workers), resume_run=leg > 0, fit_callbacks=callbacks)
        else:
            last = run_training(cfg("chain", workers), resume_run=True, fit_callbacks=callbacks)
    plain = run_training(cfg("chain-plain", 2), fit_callbacks=[TraceBlocks(tmp, "plain")])
    return {"tmp": tmp, "cfg": cfg("chain", 1), "last": last, "plain": plain}


def test_resumes_across_worker_counts_train_on_the_global_order_exactly(chain):
    """2 -> 1 -> 2 -> 3 workers: every global position trained exactly once, none skipped,
    each holding the very block an uninterrupted 2-worker run trained on there, and the
    block the order computed without Ray puts there."""
    tmp, cfg = chain["tmp"], chain["cfg"]
    assert chain["last"].steps == CHAIN_STEPS
    kept = effective(tmp, [("leg0", 1, 2), ("leg1", 3, 4), ("leg2", 5, 6), ("leg3", 7, CHAIN_STEPS)])
    n = 2 * 8 * 2 + 2 * 8 * 1 + 2 * 8 * 2 + 6 * 8 * 3  # blocks: steps x batch x workers per leg
    assert sorted(kept) == list(range(n))  # no position twice (checked in effective), none skipped
    plain = effective(tmp, [("plain", 1, CHAIN_STEPS)])
    assert len(plain) == CHAIN_STEPS * 8 * 2
    assert {p: kept[p] for p in plain} == plain
    # the whole of it (past what the plain run reached) against the order computed locally
    source = local_source(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)
    walk = WorkerBlocks(source, cfg.train.seed, DataPosition(), batch_size=n)
    batch = next(walk)
    assert kept == dict(zip(batch.positions.tolist(), zip(batch.ids.tolist(), batch.epochs.tolist())))


def test_resume_errors_name_the_problem(runs, capsys, demo_dir):
    tmp, db = runs["tmp"], runs["db"]
    base = [
        "train",
        "debug",
        "--set",
        f"data.demo_dir={demo_dir}",
        "--set",
        f"train.storage_path={tmp / 'rr'}",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        f"train.eval_every={EVAL}",
        "--set",
        "optim.warmup_steps=2",
        "--set",
        f"tracking.tracking_uri=sqlite:///{db}",
        "--set",
        "scaling.cpus_per_worker=0.5",
    ]
    before = sorted(p.name for p in (tmp / "rr").iterdir())

    def expect(argv, *needles):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("raydrat: error:"), err
        for n in needles:
            assert n in err, err

    expect(
        [*base, "--set", "name=resumable", "--set", "optim.lr=0.01", "--set", "train.seed=1", "--resume"],
        "optim.lr: 0.003 -> 0.01",
        "train.seed: 1337 -> 1",
    )
    expect([*base, "--set", "name=never-ran", "--resume"], "no run of config name 'never-ran'")
    write_run_record(_cfg(demo_dir, tmp / "rr", db, "name=early"), "early-1", None, None)
    expect([*base, "--set", "name=early", "--resume"], "no complete checkpoint", "early-1")
    expect(
        [*base, "--set", "scaling.num_workers=9"],
        "scaling.num_workers=9",
        "needs 4.5 CPUs",
        "the Ray cluster has 2 CPUs and 0 GPUs",
    )
    # more workers than the cluster holds: refused, not left hanging (an elastic run: its minimum)
    expect(
        [*base, "--set", "scaling.num_workers=[3, 4]", "--set", "scaling.cpus_per_worker=1"],
        "the minimum of scaling.num_workers, 3,",
        "needs 3 CPUs for the Train workers but the Ray cluster has 2 CPUs",
        "set scaling.cpus_per_worker=0.66",
    )
    # a used run name is never continued by a new run
    expect(
        [*base, "--set", "name=resumable", "--set", f"tracking.run_name={runs['resumed'].run_name}"],
        f"run name {runs['resumed'].run_name!r} is already used",
        f"--resume {runs['resumed'].run_name}",
    )
    # nothing was written by the refused commands (beyond the record made above)
    assert sorted(p.name for p in (tmp / "rr").iterdir()) == sorted([*before, "early-1"])


def test_killed_worker_is_replaced_and_run_completes(ray_local, demo_dir, tmp_path):
    db = tmp_path / "mlruns.db"
    cfg = _cfg(
        demo_dir,
        tmp_path / "rr",
        db,
        "train.max_failures=1",
        "scaling.num_workers=2",
        "sync.mode=local",
        "sync.sync_steps=2",
    )
    summary = run_training(cfg, fit_callbacks=[KillAt(7, rank=1)])
    assert summary.steps == STEPS
    assert _history(db, summary.mlflow_run_id, "resumed_from_step") == {EVAL: EVAL}
    assert sorted(_history(db, summary.mlflow_run_id, "val_loss")) == [EVAL, STEPS]
    comm = _history(db, summary.mlflow_run_id, "comm_bytes_per_step")
    assert comm and max(comm.values()) > 0  # local/2 logged every step: bytes on sync steps only


def test_resume_starts_from_the_newer_of_ray_trains_record_and_the_latest_directory(tmp_path):
    """A run killed right after a save: Ray Train's record may end one checkpoint earlier
    than storage (or hold none); a retry after a later save may get Ray Train's newer one
    only; --resume starts from the newest complete save either way."""
    from test_checkpoints import _save

    old, new = (
        (tmp_path / "checkpoint_2026-11-23_13-08-53.453148"),
        (tmp_path / "checkpoint_2026-11-23_13-09-54.818146"),
    )
    assert choose_checkpoint(tmp_path) == (None, [])
    _save(old, 5)
    assert choose_checkpoint(tmp_path, also=(str(old),))[0] == old  # Ray's record only
    _save(new, 10)
    assert choose_checkpoint(tmp_path, also=(str(old),))[0] == new  # storage is newer than Ray's record
    late = tmp_path.parent / "elsewhere" / "checkpoint_2026-11-23_13-10-55.000000"
    _save(late, 15)
    assert choose_checkpoint(tmp_path, also=(str(late),))[0] == late  # Ray's record is newer


def test_an_elastic_run_trains_on_the_global_order(ray_local, demo_dir, tmp_path):
    """``scaling.num_workers: [1, 2]`` runs as Ray Train's elastic ``ScalingConfig(num_workers=
    (1, 2))``: it starts with as many workers as the cluster has room for, and whatever that
    number, every global position is trained once, with the block the order holds there."""
    cfg = _cfg(demo_dir, tmp_path / "rr", tmp_path / "mlruns.db", "scaling.num_workers=[1, 2]", "train.steps=6")
    assert cfg.scaling.num_workers == (1, 2)
    summary = run_training(cfg, fit_callbacks=[TraceBlocks(tmp_path, "elastic")])
    assert summary.steps == 6
    steps = read_traces(tmp_path, "elastic")
    world = len(steps[1]) // 8
    assert 1 <= world <= 2 and all(len(steps[s]) == 8 * world for s in steps)
    kept = effective(tmp_path, [("elastic", 1, 6)])
    source = local_source(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)
    batch = next(WorkerBlocks(source, cfg.train.seed, DataPosition(), batch_size=len(kept)))
    assert kept == dict(zip(batch.positions.tolist(), zip(batch.ids.tolist(), batch.epochs.tolist(), strict=True)))
