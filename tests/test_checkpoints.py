"""Checkpoints count only when complete, run names are never silently reused nor shared by
two drivers, a finished run is not resumed, a run that would wait forever for the data
stream's CPU is refused, and a crash is told in one line. Pure files and functions, no Ray:
the process-level checks (signals, resume, retries, a full disk) are in test_signals.py and
test_resume.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from raydrat import crash
from raydrat.cli import main
from raydrat.config import ConfigError, load_config
from raydrat.config.model import ModelConfig
from raydrat.core.checkpoint.state import DataPosition, load_state, save_checkpoint, verify_checkpoint
from raydrat.core.model.build import build_model
from raydrat.core.techniques.bundle import Techniques
from raydrat.ray_train import resume
from raydrat.ray_train.fits import check_cluster_fits

TINY = ModelConfig(vocab_size=64, seq_len=8, d_model=16, n_layer=2, n_head=2, n_kv_head=1)


def _save(directory: Path, step: int, world_size: int = 2) -> Path:
    """Every rank's part of a real checkpoint of a tiny model, as Ray Train merges them."""
    for rank in range(world_size):
        model = build_model(TINY, seed=rank)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        save_checkpoint(
            directory,
            model,
            opt,
            step,
            {"name": "t"},
            Techniques.plain(TINY.n_layer),
            DataPosition(blocks=step * 16),
            rank,
            world_size,
        )
    return directory


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run with checkpoints at steps 2, 4, 6 and 8 (names sort by save time, as Ray's do)."""
    d = tmp_path / "run"
    for i, step in enumerate((2, 4, 6, 8)):
        _save(d / f"checkpoint_2026-01-01_00-00-0{i}.000000", step)
    return d


def test_a_checkpoint_is_complete_only_with_every_rank_manifest_and_matching_files(run_dir):
    newest = sorted(run_dir.iterdir())[-1]
    assert verify_checkpoint(newest) is None
    manifest = json.loads((newest / "manifest-rank1.json").read_text())
    assert manifest["world_size"] == 2 and set(manifest["files"]) == {"rank1.pt", "data-rank1.json"}
    assert set(json.loads((newest / "manifest-rank0.json").read_text())["files"]) == {
        "state.pt",
        "rank0.pt",
        "data-rank0.json",
    }

    # the faults a kill or a disk leaves: each is named
    broken = run_dir / "broken"
    cases = {
        "truncated": (
            lambda d: (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:100]),
            r"state.pt \(rank 0\) is 100 bytes, its manifest says \d+ \(truncated",
        ),
        "rank file": (lambda d: (d / "rank1.pt").unlink(), r"rank1.pt \(rank 1\) is missing"),
        "rank save": (
            lambda d: [(d / f).unlink() for f in ("rank1.pt", "manifest-rank1.json")],
            r"manifest of rank\(s\) 1 of 2 is missing",
        ),
        "no manifest": (lambda d: [p.unlink() for p in d.glob("manifest-*")], r"no manifest"),
        "flipped": (lambda d: _flip_byte(d / "rank0.pt"), r"rank0.pt \(rank 0\) does not match its manifest's sha256"),
    }
    for name, (fault, reason) in cases.items():
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(newest, broken)
        fault(broken)
        why = verify_checkpoint(broken)
        assert why is not None, name
        assert re.search(reason, why), (name, why)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_takes_the_newest_complete_checkpoint_and_says_why(run_dir):
    dirs = sorted(run_dir.iterdir())
    (dirs[3] / "state.pt").write_bytes((dirs[3] / "state.pt").read_bytes()[:1000])  # truncated newest
    (dirs[2] / "rank1.pt").unlink()  # a rank's file gone
    chosen, skipped = resume.choose_checkpoint(run_dir)
    assert chosen == dirs[1] and load_state(str(chosen))["step"] == 4
    assert [Path(d).name for d, _ in skipped] == [dirs[3].name, dirs[2].name]
    text = resume.describe_choice(chosen, skipped)
    assert text.startswith(f"{dirs[1].name} (step 4); skipped {dirs[3].name}: state.pt"), text
    assert "rank1.pt (rank 1) is missing" in text
    assert resume.latest_checkpoint(run_dir) == dirs[1]  # the API the driver and workers use


def test_resume_refuses_when_no_checkpoint_is_complete(tmp_path, run_dir):
    cfg = load_config("debug", [f"train.storage_path={run_dir.parent}"])
    resume.write_run_record(cfg, "run", None, None)
    for m in run_dir.glob("checkpoint_*/manifest-*.json"):  # saves from before manifests, or all cut off
        m.unlink()
    with pytest.raises(ConfigError, match=r"no complete checkpoint in .*run \(skipped checkpoint_.*no manifest"):
        resume.prepare_resume(cfg, "run")


def test_an_interrupt_leaves_only_complete_checkpoints(run_dir):
    dirs = sorted(run_dir.iterdir())
    (dirs[3] / "state.pt").write_bytes(b"torn")  # cut off mid-save, unknown to Ray
    (dirs[0] / "manifest-rank1.json").unlink()  # incomplete but registered by Ray Train
    (run_dir / resume.RAY_SNAPSHOT).write_text(
        json.dumps(
            {"checkpoint_results": [{"checkpoint_dir_name": dirs[0].name}, {"checkpoint_dir_name": dirs[2].name}]}
        )
    )
    assert resume.prune_incomplete(run_dir) == [dirs[3].name]
    assert resume.checkpoint_dirs(run_dir) == dirs[:3]  # Ray's record never loses a directory


def test_a_used_run_name_is_refused_and_default_names_never_collide(tmp_path):
    cfg = load_config("debug", [f"train.storage_path={tmp_path}", "tracking.run_name=mine"])
    assert resume.new_run_name(cfg) == "mine"  # unused
    resume.write_run_record(cfg, "mine", None, None)
    assert resume.new_run_name(cfg) == "mine"  # stopped before any checkpoint: nothing to inherit
    _save(tmp_path / "mine" / "checkpoint_2026-01-01_00-00-00.000000", 2)
    with pytest.raises(ConfigError, match=r"run name 'mine' is already used .*--resume mine.*tracking.run_name"):
        resume.new_run_name(cfg)
    default = load_config("debug", [f"train.storage_path={tmp_path}"])
    names = {resume.new_run_name(default) for _ in range(50)}  # same second, same config
    assert len(names) == 50 and all(n.startswith("debug-") for n in names)


def test_the_fit_check_counts_the_workers_cpus():
    def cfg(*sets):
        return load_config("debug", list(sets))

    three = cfg("scaling.num_workers=3")
    with pytest.raises(
        ConfigError,
        match=(
            r"scaling.num_workers=3 x scaling.cpus_per_worker=1 needs 3 CPUs for the Train workers but the Ray "
            r"cluster has 2 CPUs and 0 GPUs.*set scaling.cpus_per_worker=0.66"
        ),
    ):
        check_cluster_fits(three, False, {"CPU": 2.0})
    check_cluster_fits(cfg("scaling.num_workers=2"), False, {"CPU": 2.0})  # the data needs no CPU of its own
    check_cluster_fits(cfg("scaling.num_workers=[2, 8]"), False, {"CPU": 2.0})  # elastic: its minimum fits
    check_cluster_fits(cfg(), False, {"CPU": 2.0})  # the debug recipe on 2 CPUs
    with pytest.raises(ConfigError, match=r"give Ray at least 1 CPUs"):
        check_cluster_fits(cfg("scaling.cpus_per_worker=1"), False, {"CPU": 0.0})
    check_cluster_fits(cfg("scaling.num_workers=2", "scaling.wait_for_resources=true"), False, {"CPU": 2.0})


def test_a_run_folder_is_one_drivers_and_a_refused_start_leaves_nothing(tmp_path):
    cfg = load_config("debug", [f"train.storage_path={tmp_path}", "tracking.run_name=mine"])
    with resume.claim(cfg, "mine", new=True):
        with pytest.raises(ConfigError, match=r"run 'mine' is in use: pid \d+ on \S+ is writing to .*--resume mine"):
            with resume.claim(cfg, "mine", new=False):  # a second driver (or a second --resume)
                pass
        resume.write_run_record(cfg, "mine", None, None)
    with resume.claim(cfg, "mine", new=True):  # let go: a run without checkpoints may be started again
        pass
    with pytest.raises(RuntimeError), resume.claim(cfg, "fresh", new=True):
        raise RuntimeError("refused before it wrote anything")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # the fresh folder went with it
    _save(tmp_path / "mine" / "checkpoint_2026-01-01_00-00-00.000000", 2)
    with pytest.raises(ConfigError, match=r"run name 'mine' is already used .*--resume mine"):
        with resume.claim(cfg, "mine", new=True):
            pass


def test_a_finished_run_is_not_resumed_and_says_how_to_train_it_further(run_dir, capsys):
    storage = run_dir.parent
    cfg = load_config("debug", [f"train.storage_path={storage}"])
    resume.write_run_record(cfg, "run", None, None)
    assert resume.previous_driver(resume.read_run_record(run_dir)).startswith("pid ")  # left running: killed
    resume.mark_run(run_dir, "finished")
    assert resume.previous_driver(resume.read_run_record(run_dir)) is None
    assert main(["train", "debug", "--set", f"train.storage_path={storage}", "--resume", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raydrat: error: --resume run: the run finished (all 20 steps"), err
    assert f"--set model.init_from={run_dir.resolve()}" in err[0]


def test_a_crash_is_told_by_its_cause_and_place(tmp_path):
    import ray.exceptions

    full = OSError(28, "No space left on device")
    try:
        raise RuntimeError("Training failed") from full
    except RuntimeError as exc:
        line = crash.describe(exc, tmp_path)
    assert line.startswith(f"disk full: no space left on device writing to {tmp_path} (") and " free of " in line
    # the raylet's account of a kill by Ray's memory monitor, as a task's error carries it
    oom = ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.5, ID: 3f2a) was "
        "7.5GB used / 7.77GB limit (0.965284)\nRay killed 1 worker(s) based on the killing policy"
    )
    assert crash.describe(oom, tmp_path).startswith(
        "out of memory: Ray's memory monitor killed a training worker on node 10.0.0.5: memory in use 7.5GB of its "
        "7.77GB limit (97%"
    )
    died = RuntimeError(
        "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tactor_id: ab\n"
        "\tpid: 4242\n\tip: 10.0.0.7\nThe actor is dead because its worker process has died."
    )
    assert crash.describe(died, tmp_path).startswith(
        "a training worker's process (pid 4242 on node 10.0.0.7) died: killed (the kernel's OOM killer, or a kill -9)"
    )
    assert crash.describe(ValueError("bad\nmore"), tmp_path) == "training failed: ValueError: bad"
