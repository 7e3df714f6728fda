"""Two Ray nodes joined by a real, bandwidth-limited link (raydrat.bench.link).

The harness's link is measured with a plain TCP stream (an instrument independent of Ray
and of tc's own report), and bad rates end in one ``ConfigError``. The slow end-to-end
test runs the real ``raydrat train`` as the driver inside node a's namespace: two DDP
workers, one per node (``scaling.worker_resources``); the remote worker's process is found
with ``ip netns pids`` of node b and SIGKILLed twice: once within ``train.max_failures=1``
(the run recovers from its newest checkpoint) and once beyond it (the run stops); then
``--resume`` finishes it. The checkpoints' per-rank files say where each rank ran and how
far it got in its data stream.

Needs root and network namespaces; skipped otherwise, with the harness's reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, raydrat_cmd

from raydrat.bench.link import (
    ENV_VAR,
    NODE_RESOURCE,
    TwoNodeLink,
    attached,
    parse_rates,
    unavailable_reason,
)
from raydrat.bench.sync_faults import fault_figures, run_fault_bench
from raydrat.config import ConfigError, load_config
from raydrat.core.checkpoint.state import verify_checkpoint
from raydrat.ray_train.fits import check_cluster_fits
from raydrat.ray_train.lighthouse import by_ip

STEPS, EVERY, RATE_MBIT = 24, 6, 100


@pytest.fixture(scope="module")
def namespaces_ok():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


def test_rates_parse_and_bad_ones_name_the_flag():
    assert parse_rates("1000, 100,20") == [1000.0, 100.0, 20.0]
    for bad, needle in [
        ("abc", "not a number"),
        ("100,,20", "comma-separated"),
        ("-5", "positive"),
        ("0", "positive"),
        ("nan", "positive"),
    ]:
        with pytest.raises(ConfigError, match=needle) as exc:
            parse_rates(bad)
        assert str(exc.value).startswith("--link ") and "e.g. --link 1000,100,20" in str(exc.value)


def test_link_rate_limits_a_tcp_stream_and_tc_refusals_are_config_errors(namespaces_ok):
    with TwoNodeLink(rate_mbit=20, start_ray=False) as link:
        names = set(link.namespace.values())
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert names <= {line.split()[0] for line in listed.splitlines() if line.strip()}
        slow = link.measure_mbit(1.5)
        link.set_rate(100)  # changed in place, between runs
        assert [link.applied_rate_mbit(ns) for ns in names] == [100.0, 100.0]
        fast = link.measure_mbit(1.5)
        # never above the rate; TCP reaches 90-97% of a tbf rate on an idle machine (headers,
        # slow start), less when the loaded CPUs starve the two ends; a veth alone carries Gbit/s
        assert 0.5 * 20 < slow <= 20 * 1.02, slow
        assert 0.5 * 100 < fast <= 100 * 1.02, fast
        assert fast > 3 * slow, (slow, fast)
        for rate, needle in [
            (5e-7, "tc refuses this rate"),
            (1e14, "tc refuses this rate"),
            (1e-5, "tc applies 8e-06 Mbit/s instead"),
        ]:
            with pytest.raises(ConfigError, match=needle):
                link.set_rate(rate)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not names & {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_without_namespace_capabilities_the_harness_says_why_in_one_line():
    """A real refusal: root without CAP_SYS_ADMIN/CAP_NET_ADMIN (setpriv empties the
    capability bounding set) cannot create the namespaces; callers fall back to one node."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop capabilities")
    code = (
        "from raydrat.bench.link import LinkUnavailable, TwoNodeLink, unavailable_reason\n"
        "print(unavailable_reason())\n"
        "try:\n    TwoNodeLink(rate_mbit=10).start()\nexcept LinkUnavailable as e:\n    print(e)\n"
    )
    r = subprocess.run(
        ["setpriv", "--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    reason, raised = r.stdout.strip().splitlines()
    assert reason == raised and reason.startswith("two-node link unavailable: cannot create a network namespace (")


def test_worker_resources_are_checked_against_the_cluster():
    cfg = load_config(
        "debug",
        ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5", f"scaling.worker_resources={{{NODE_RESOURCE}: 1}}"],
    )
    assert cfg.scaling.worker_resources == {NODE_RESOURCE: 1.0}
    check_cluster_fits(cfg, False, {"CPU": 4, NODE_RESOURCE: 2})
    with pytest.raises(
        ConfigError,
        match=rf"scaling.worker_resources.{NODE_RESOURCE}=1 x scaling.num_workers=2 "
        r"needs 2 but the Ray cluster's nodes advertise 1",
    ):
        check_cluster_fits(cfg, False, {"CPU": 4, NODE_RESOURCE: 1})
    for bad, needle in [
        ("{CPU: 1}", "scaling.worker_resources.CPU: set scaling.cpus_per_worker"),
        ("{x: 0}", "scaling.worker_resources.x=0.0: give a positive amount"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config("debug", [f"scaling.worker_resources={bad}"])


# -- the two-node run ------------------------------------------------------------------


def _train(demo_dir: Path, tmp: Path, *extra: str) -> list[str]:
    # every save is an evaluation: Ray Train 2.60 writes a save's val_loss=inf (no evaluation)
    # as null in its checkpoint-manager snapshot, and a resumed run's controller then fails
    # ranking the next save (TypeError: float * None)
    sets = [
        # a path both nodes read (one machine's disk): the demo corpus by name is refused on two nodes
        f"data.sources=[{{path: {demo_dir / 'corpus'}}}]",
        f"data.tokenizer_path={demo_dir / 'tokenizer-512.json'}",
        f"data.demo_dir={demo_dir}",
        f"train.storage_path={tmp / 'store'}",
        f"train.steps={STEPS}",
        f"train.eval_every={EVERY}",
        "train.log_every=1",
        "optim.warmup_steps=2",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns.db'}",
        "name=twonode",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        f"scaling.worker_resources={{{NODE_RESOURCE}: 1}}",
        "train.max_failures=1",
        "train.checkpoints_to_keep=10",
    ]  # every save stays for the checks below
    args = ["train", "debug", *(a for s in sets for a in ("--set", s)), *extra]
    return raydrat_cmd(*args)


class Checkpoints:
    """The run's complete checkpoints in storage (state.pt and both ranks' files), by step."""

    def __init__(self, store: Path):
        self.store = store
        self.loaded: dict[Path, dict] = {}

    def complete(self) -> dict[int, dict]:
        out = {}
        for d in sorted(self.store.glob("*/checkpoint_*")):
            if d not in self.loaded and verify_checkpoint(d) is None:
                try:
                    self.loaded[d] = {
                        "step": torch.load(d / "state.pt", weights_only=False)["step"],
                        "ranks": [torch.load(d / f"rank{r}.pt", weights_only=False) for r in (0, 1)],
                        "positions": [json.loads((d / f"data-rank{r}.json").read_text()) for r in (0, 1)],
                    }
                except Exception:
                    continue
            if d in self.loaded:
                out[self.loaded[d]["step"]] = self.loaded[d]
        return out

    def newest_step(self) -> int:
        return max(self.complete(), default=0)


def _wait(what: str, probe, driver: subprocess.Popen, log: Path, timeout_s: float = 150):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        if driver.poll() is not None:
            break
        time.sleep(0.05)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    pytest.fail(f"waiting for {what}: driver exit {driver.poll()} after {timeout_s}s at most; its log ends:\n{tail}")


def _history(db: Path, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient  # heavy; only the slow test needs it

    return {m.step: m.value for m in MlflowClient(tracking_uri=f"sqlite:///{db}").get_metric_history(run_id, key)}


@pytest.mark.slow
def test_two_nodes_train_recover_from_a_killed_remote_worker_and_resume(namespaces_ok, demo_dir, tmp_path):
    t0 = time.perf_counter()
    ckpts = Checkpoints(tmp_path / "store")
    with TwoNodeLink(rate_mbit=RATE_MBIT) as link:
        log = tmp_path / "run.log"
        with open(log, "w") as out:
            driver = link.popen(
                _train(demo_dir, tmp_path),
                env={"PYTHONUNBUFFERED": "1"},
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # both nodes host a training worker; kill the remote one after the first checkpoint
        first = _wait("a first complete checkpoint", ckpts.newest_step, driver, log)
        on_a, on_b = link.worker_pids("a"), link.worker_pids("b")
        assert len(on_a) == 1 and len(on_b) == 1, (on_a, on_b)
        os.kill(on_b[0], signal.SIGKILL)
        # within max_failures=1: Ray Train starts a new worker group, again one worker per node
        replacement = _wait(
            "a replacement worker on each node",
            lambda: (
                [p for p in link.worker_pids("b") if p != on_b[0]]
                if [p for p in link.worker_pids("a") if p != on_a[0]]
                else None
            ),
            driver,
            log,
        )
        recovered_from = ckpts.newest_step()  # the old group is gone: nothing newer can appear
        assert recovered_from >= first
        # once the new group has saved, kill again: beyond max_failures, the run stops
        saved_again = _wait(
            "a checkpoint saved after the recovery",
            lambda: max((s for s in ckpts.complete() if s > recovered_from), default=None),
            driver,
            log,
        )
        assert saved_again < STEPS, "the run ended before the second kill: raise STEPS"
        os.kill(replacement[0], signal.SIGKILL)
        assert driver.wait(timeout=120) != 0, log.read_text()[-3000:]
        stopped_at = ckpts.newest_step()
        assert recovered_from < stopped_at < STEPS
        # --resume continues the interrupted run to the end
        resumed = link.run(
            [*_train(demo_dir, tmp_path), "--resume"],
            env={"PYTHONUNBUFFERED": "1"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
        assert f"{STEPS} steps" in resumed.stdout
        ip_a, ip_b = link.ip["a"], link.ip["b"]
    wall_s = time.perf_counter() - t0

    run_dir = next((tmp_path / "store").glob("twonode-*"))
    run_id = json.loads((run_dir / "raydrat_run.json").read_text())["mlflow_run_id"]
    db = tmp_path / "mlruns.db"
    # one MLflow run: recovered once inside the first command, resumed once by --resume
    assert _history(db, run_id, "resumed_from_step") == {recovered_from: recovered_from, stopped_at: stopped_at}
    assert sorted(_history(db, run_id, "train_loss")) == list(range(1, STEPS + 1))
    final = ckpts.complete()
    assert sorted(final) == list(range(EVERY, STEPS + 1, EVERY))  # every save is complete
    # every checkpoint in the shared storage holds one rank file written on each node, and the
    # remote rank's copy of the world's data position (blocks of the global order consumed)
    # moves on with every save, through both restarts, by the same number of blocks a step
    for c in final.values():
        nodes = [r["node_ip"] for r in c["ranks"]]
        assert sorted(nodes) == sorted([ip_a, ip_b]), nodes
    remote = [
        c["positions"][[r["node_ip"] for r in c["ranks"]].index(ip_b)]["blocks"] for _, c in sorted(final.items())
    ]
    per_step = remote[0] // min(final)
    assert per_step > 0 and remote == [per_step * s for s in sorted(final)], remote
    print(f"two-node test: {wall_s:.0f}s, load average {Path('/proc/loadavg').read_text().split()[:3]}")


# -- what a death costs (raydrat bench sync --faults) ------------------------------------


def test_a_command_the_link_runs_reaches_its_nodes_but_never_closes_them(monkeypatch):
    net = TwoNodeLink(rate_mbit=10, cpus_per_node=3, start_ray=False)  # not started: nothing made
    net.temp_dir = Path("/tmp/rdl-test")
    monkeypatch.setenv(ENV_VAR, net.env()[ENV_VAR])
    got = attached()
    assert (got.namespace, got.ip, got.address, got.temp_dir) == (net.namespace, net.ip, net.address, net.temp_dir)
    assert got.cpus_per_node == 3 and got.resources == {NODE_RESOURCE: 1}
    with pytest.raises(ValueError, match="node a holds the head"):
        got.kill_node("a")
    monkeypatch.delenv(ENV_VAR)
    assert attached() is None


def test_torchft_addresses_carry_the_node_ip_not_the_host_name():
    assert by_ip("http://vm:4242", "10.213.7.2") == "http://10.213.7.2:4242"
    assert by_ip("http://vm:4242", "fd00::2") == "http://[fd00::2]:4242"


def test_fault_bench_refuses_bad_kill_kinds_before_any_run(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    cfg = load_config("debug")
    with pytest.raises(ConfigError, match=r"--kill 'bogus': give process, node or both"):
        run_fault_bench(cfg, 5, (4,), kills=("bogus",))
    with pytest.raises(ConfigError, match=r"--kill node kills the remote node of the two-node link: add --link"):
        run_fault_bench(cfg, 5, (4,), kills=("node",))


def test_fault_figures_count_repeated_steps_and_the_time_to_the_replacement(tmp_path):
    # the victim (rank 0) dies after step 4 at t=4.5; its replacement's first step is at t=9;
    # the survivor (rank 1) restarted from step 2: steps 3 and 4 trained twice
    (tmp_path / "killed").write_text(json.dumps({"time": 4.5, "rank": 0}))
    victim = [[10, s, float(s)] for s in (1, 2, 3, 4)] + [[11, s, 6.0 + s] for s in (3, 4, 5)]
    survivor = [[20, s, float(s)] for s in (1, 2, 3, 4)] + [[21, s, 6.0 + s] for s in (3, 4, 5)]
    for rank, lines in ((0, victim), (1, survivor)):
        (tmp_path / f"rank{rank}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = fault_figures(tmp_path, kill_step=4, tokens_per_replica_step=100)
    assert got["victim_rank"] == 0 and got["lost_steps"] == 2 and got["rejoined_at_step"] == 3
    assert got["back_after_s"] == pytest.approx(4.5)
    assert got["before_tokens_per_s"] == pytest.approx(300 / 3)  # steps 1-4: 3 intervals of 1 s
