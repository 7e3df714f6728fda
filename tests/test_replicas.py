"""Local updates on torchft replica groups (sync.engine: torchft) under Ray Train: on two Ray
nodes joined by the rate-limited link (raydrat.bench.link), one replica each, a node killed
mid-run is replaced alone; the survivor never restarts or repeats a step, the replacement
joins with the survivor's exact weights at its first sync, and the MLflow run shows the death
and the rejoin. The Lighthouse killed mid-run: every replica ends and Ray
Train brings them back from the newest complete checkpoint with a new Lighthouse. Plus the
one-line refusals."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, faulty_raydrat_cmd, run_cli
from faults import KillLighthouseAt, StepTrace

from raydrat.bench.link import NODE_RESOURCE, TwoNodeLink, unavailable_reason
from raydrat.config import load_config
from raydrat.core import metrics as M
from raydrat.ray_train.trainer import run_training

STEPS, H, KILL = 64, 4, 10
"""64 steps paced at 0.4 s: the replacement (a new Ray worker and its join) has about 20 s to
arrive before the survivor ends, on a loaded 2-core machine."""


def _overrides(demo_dir: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        f"data.demo_dir={demo_dir}",
        f"train.storage_path={tmp / 'runs'}",
        f"train.steps={STEPS}",
        f"train.eval_every={STEPS}",
        "train.log_every=1",
        "train.max_failures=3",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns.db'}",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        "sync.mode=local",
        "sync.engine=torchft",
        f"sync.sync_steps={H}",
        *extra,
    ]


@pytest.fixture(scope="module")
def namespaces_ok():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


def _cfg(demo_dir: Path, tmp: Path, *extra: str):
    return load_config("debug", _overrides(demo_dir, tmp, *extra))


def _trace(directory: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


def _history(db: Path, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, key)}


NODE_STEPS = 120
"""The node test's steps, paced at 0.4 s: after the kill the survivor trains about 40 s more,
time for Ray to see the node gone, the node to start again and the replacement to join."""


def _wait_for(what: str, probe, driver: subprocess.Popen, log: Path, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None:
        got = probe()
        if got is not None:
            return got
        time.sleep(0.05)
    pytest.fail(f"waiting for {what}: driver exit {driver.poll()}; its log ends:\n{log.read_text()[-4000:]}")


def _victim_at(traces: Path, net: TwoNodeLink, step: int) -> int | None:
    """The rank whose worker runs on node b, once it has trained ``step``."""
    on_b = set(net.worker_pids("b"))
    for rank in (0, 1):
        path = traces / f"rank{rank}.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if any(e.get("step", -1) >= step and e["pid"] in on_b for e in lines):
            return rank
    return None


@pytest.mark.slow
def test_a_killed_node_is_replaced_alone_and_its_replica_rejoins_with_the_survivors_weights(
    namespaces_ok, demo_dir, tmp_path
):
    """Two Ray nodes on the rate-limited link, one replica each (DiLoCo: the heal carries the
    outer optimizer's state too). Node b dies whole (its raylet, agents and worker, SIGKILL)
    and starts again; the replica on node a keeps training alone, and Ray Train places a
    replacement on the new node b, healed from the survivor over the link."""
    traces = tmp_path / "trace"
    traces.mkdir()
    sets = [
        *_overrides(demo_dir, tmp_path, "sync.outer_optimizer=nesterov"),
        f"data.sources=[{{path: {demo_dir / 'corpus'}}}]",  # one machine's disk: both nodes read it
        f"data.tokenizer_path={demo_dir / 'tokenizer-512.json'}",
        f"train.steps={NODE_STEPS}",
        f"train.eval_every={NODE_STEPS}",
        f"scaling.worker_resources={{{NODE_RESOURCE}: 1}}",
    ]
    spec = [["StepTrace", {"directory": str(traces), "pace_s": 0.4}]]
    log = tmp_path / "run.log"
    with TwoNodeLink(rate_mbit=100) as net, open(log, "w") as out:
        driver = net.popen(
            faulty_raydrat_cmd(spec, "train", "debug", *(a for s in sets for a in ("--set", s))),
            env={k: v for k, v in cli_env().items() if k in ("PYTHONPATH", "PYTHONUNBUFFERED")},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        victim = _wait_for(f"node b's replica at step {KILL}", lambda: _victim_at(traces, net, KILL), driver, log)
        killed = net.kill_node("b")
        net.start_node("b")
        assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
    assert killed
    run_id = re.search(r"MLflow run (\w+)", log.read_text()).group(1)

    # the survivor never restarted, never went back, never repeated a step (it may start after
    # step 0: a replica that starts late joins the first ones, healed, at their sync)
    survivor = _trace(traces, 1 - victim)
    assert len({e["pid"] for e in survivor}) == 1
    first = survivor[0]["start"]
    assert first < KILL
    steps = [e["step"] for e in survivor if "step" in e]
    assert steps == list(range(first + 1, NODE_STEPS + 1))

    lines = _trace(traces, victim)
    pids = list(dict.fromkeys(e["pid"] for e in lines))
    assert len(pids) == 2, pids  # the killed process and its replacement on the new node
    assert pids[0] in killed
    dead = [e["step"] for e in lines if e["pid"] == pids[0] and "step" in e]
    assert KILL <= max(dead) < KILL + H  # the node died within a sync interval of step KILL
    joined = [e for e in lines if e["pid"] == pids[1]]
    start = joined[0]["start"]
    assert max(dead) < start < NODE_STEPS and start % H == 0  # it rejoined at a sync of the survivor's
    at_sync = {e["step"]: e["checksum"] for e in survivor if "step" in e}
    assert joined[0]["checksum"] == at_sync[start]  # exactly the survivor's weights after that sync

    # the group's history, whoever logged each step: the death, the quorum of one, the rejoin
    db = tmp_path / "mlruns.db"
    left, quorum, rejoined, healed = (
        _history(db, run_id, key) for key in (M.REPLICAS_LEFT, M.QUORUM_SIZE, M.REPLICAS_JOINED, M.HEALED_AT_STEP)
    )
    seen = f"victim rank {victim}, rejoined at {start}; {_changes(quorum, left, rejoined)}"
    assert sum(left.values()) == 1, seen
    (gone,) = [s for s, v in left.items() if v]
    assert KILL < gone <= start, seen
    # the one gap: if the victim logged, the steps it trained but had not delivered when it was
    # killed, up to the survivor's sync that found it gone (from there on the survivor logs)
    missing = set(range(1, NODE_STEPS + 1)) - set(quorum)
    assert all(KILL < s < gone for s in missing) and (victim == 0 or not missing), (missing, seen)
    alone = sorted(s for s, v in quorum.items() if v == 1.0 and s > KILL)
    assert alone and alone == list(range(min(alone), start)) and quorum[NODE_STEPS] == 2.0, seen
    assert healed[start] == float(start) and rejoined[start] == 1.0, seen
    assert all(s < KILL for s, v in rejoined.items() if v and s != start), seen  # else only a late first start


def _changes(quorum: dict[int, float], left: dict[int, float], joined: dict[int, float]) -> str:
    """The steps where the logged quorum changed or a replica left or joined (a failure's story)."""
    steps = sorted(set(quorum) | set(left) | set(joined))
    sizes = [s for i, s in enumerate(steps) if i == 0 or quorum.get(s) != quorum.get(steps[i - 1])]
    return (
        f"logged steps {steps[0] if steps else None}..{steps[-1] if steps else None} ({len(steps)}), "
        f"quorum changes {[(s, quorum.get(s)) for s in sizes]}, "
        f"left {[s for s, v in left.items() if v]}, joined {[s for s, v in joined.items() if v]}"
    )


LH_STEPS, LH_SAVE, LH_KILL = 24, 8, 10
LH_RUN = (f"train.steps={LH_STEPS}", f"train.eval_every={LH_SAVE}", f"train.checkpoint_every={LH_SAVE}")


@pytest.mark.slow
def test_killed_lighthouse_restarts_every_replica_from_the_newest_checkpoint(ray_local, demo_dir, tmp_path):
    """The Lighthouse actor SIGKILLed after step 10 (checkpoints every 8 steps): each replica
    notices within seconds and ends; Ray Train replaces them one by one, a new Lighthouse
    starts, the first replacement restores step 8's checkpoint and trains the steps after it
    again to the last (its syncs need a live Lighthouse); the other joins it at a sync, or
    finds the run finished if it arrives after the end. The MLflow run is FINISHED."""
    from mlflow.tracking import MlflowClient

    traces = tmp_path / "trace"
    traces.mkdir()
    cfg = _cfg(demo_dir, tmp_path, *LH_RUN)
    summary = run_training(cfg, fit_callbacks=[StepTrace(str(traces), pace_s=0.2), KillLighthouseAt(LH_KILL)])
    assert summary.steps == LH_STEPS

    starts, retrained = [], set()
    for rank in (0, 1):
        lines = _trace(traces, rank)
        pids = list(dict.fromkeys(e["pid"] for e in lines))
        assert len(pids) == 2, (rank, pids)  # every replica ended once and was replaced once
        before = [e["step"] for e in lines if e["pid"] == pids[0] and "step" in e]
        assert LH_SAVE <= max(before) <= LH_SAVE + H  # it went on until its next quorum, no further
        assert rank != 0 or LH_KILL in before  # the rank that killed the Lighthouse
        after = [e for e in lines if e["pid"] == pids[1]]
        starts.append(after[0]["start"])
        steps = [e["step"] for e in after if "step" in e]
        assert steps == list(range(starts[-1] + 1, LH_STEPS + 1))
        assert starts[-1] == LH_SAVE or starts[-1] % H == 0  # restored, or healed at a sync
        retrained |= set(before) & set(steps)
    assert min(starts) == LH_SAVE  # the newest complete checkpoint when the Lighthouse died
    assert set(range(LH_SAVE + 1, LH_KILL + 1)) <= retrained  # the steps after it, trained again

    db = tmp_path / "mlruns.db"
    assert MlflowClient(f"sqlite:///{db}").get_run(summary.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_killed_lighthouse_without_restarts_left_is_one_line_naming_it_and_the_resume(demo_dir, tmp_path):
    """``train.max_failures: 0``: the first replica that finds the Lighthouse gone ends the
    run; ``raydrat train`` says so in one ``raydrat: error:`` line and names the newest
    complete checkpoint (step 8) and the ``--resume`` command."""
    sets = [a for o in _overrides(demo_dir, tmp_path, *LH_RUN, "train.max_failures=0") for a in ("--set", o)]
    r = run_cli(
        ["train", "debug", *sets], cwd=tmp_path, timeout=300, faults_spec=[["KillLighthouseAt", {"step": LH_KILL}]]
    )
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    errors = [line for line in err if line.startswith("raydrat: error:")]
    assert len(errors) == 1, err[-20:]
    assert "the torchft Lighthouse actor died and no restart was left (train.max_failures)" in errors[0]
    tail = err[err.index(errors[0]) :]
    print("\n".join(tail))  # the console's end, shown with pytest -rP (docs/distributed.md quotes it)
    assert any("newest complete checkpoint:" in line and "(step 8)" in line for line in tail), tail
    assert any("--resume" in line for line in tail), tail


def test_torchft_refusals_name_the_keys():
    with pytest.raises(ValueError, match=r"sync.engine=torchft with scaling.num_workers=1.*set scaling.num_workers"):
        load_config("debug", ["sync.mode=local", "sync.engine=torchft"])
    with pytest.raises(ValueError, match=r"sync.engine only apply to sync.mode=local, not sync.mode=fsdp"):
        load_config("debug", ["scaling.num_workers=2", "sync.mode=fsdp", "sync.engine=torchft"])
    with pytest.raises(ValueError, match=r"sync.quantization cannot be combined with sync.engine=torchft.*Triton"):
        load_config(
            "debug", ["scaling.num_workers=2", "sync.mode=local", "sync.engine=torchft", "sync.quantization=int8"]
        )
    with pytest.raises(ValueError, match=r"train.eval_every=10 with sync.engine=torchft must be a multiple of .* = 4"):
        load_config("debug", ["scaling.num_workers=2", "sync.mode=local", "sync.engine=torchft", "sync.sync_steps=4"])
    with pytest.raises(ValueError, match=r"sync.fragments with sync.engine=torchft needs sync.outer_optimizer"):
        load_config(
            "debug",
            [
                "scaling.num_workers=2",
                "sync.mode=local",
                "sync.engine=torchft",
                "sync.sync_steps=4",
                "sync.fragments=2",
            ],
        )


@pytest.mark.slow
def test_torchft_missing_is_one_line_naming_the_extra(tmp_path):
    """torchft made unimportable in a fresh interpreter: the run is refused before Ray starts."""
    code = (
        "import sys; sys.modules['torchft'] = None\n"
        "from raydrat.cli import main\n"
        "sys.exit(main(['train', 'debug', '--set', 'scaling.num_workers=2', '--set', 'sync.mode=local',"
        f" '--set', 'sync.engine=torchft', '--set', 'train.storage_path={tmp_path}']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "raydrat: error: sync.engine=torchft needs the torchft package: pip install 'raydrat[torchft]'"
    )
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
