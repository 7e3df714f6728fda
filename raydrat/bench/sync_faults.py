"""``raydrat bench sync --faults STEP``: what one replica's death costs, today's whole-group
restart (``ddp``) against local updates on torchft replica groups (``sync.engine: torchft``).

Per variant (``ddp``, and for each ``H``: ``torchft local/H`` and ``torchft diloco/H``), two
``raydrat train`` runs of the same config, seed and data, one after the other: one
uninterrupted, and one in which rank 1's worker process kills itself (SIGKILL) right after
optimizer step ``STEP`` (``train.max_failures`` lets Ray Train replace it). Every rank
appends ``(pid, step, time)`` after each step (:class:`StepClock`), and from that:

* ``lost steps``: optimizer steps the surviving rank trained twice (a restart from the last
  checkpoint trains the steps since it again; torchft's survivors none);
* ``back after s``: seconds from the kill to the replacement's first step;
* ``alone tok/s`` against ``before tok/s``: the survivor's training rate between the kill and
  the replacement's first step, and before the kill (one replica's tokens per step);
* ``val loss`` at the end against the uninterrupted run's (equal steps; a torchft run
  trains fewer tokens: one replica's while the other is away).

``--kill node`` kills the victim's whole node instead (every process of it: raylet, agents,
workers) and starts it again (:class:`NodeKiller`); that needs two nodes, so it runs over the
two-node link of ``--link`` (:func:`run_fault_bench_over_link`), where the victim is the
worker on the other node. Without ``--link``, rank 1's process on one node (loopback).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import ray.util

from raydrat.atomic import write_text
from raydrat.bench import link
from raydrat.bench.report import print_table
from raydrat.bench.sync import run_over_link
from raydrat.config import ConfigError, RaydratConfig
from raydrat.core.fit import Callback, FitState
from raydrat.ray_train.trainer import run_training
from raydrat.tables import write_json

KILLS = ("process", "node")
"""What dies: the victim's worker ``process`` (SIGKILL), or its whole ``node`` (its raylet,
agents and workers, SIGKILLed together; only over the two-node link)."""


class StepClock(Callback):
    """Every rank appends ``[pid, step, unix time]`` after each step to
    ``directory/rank{r}.jsonl``. The victim (the rank on the node at ``victim_ip``, or rank
    ``kill_rank`` when none is given) of a group that did not start from a checkpoint, and
    did not join later, dies right after step ``kill_step``: with ``kill="process"`` it
    SIGKILLs its own process; with ``kill="node"`` it asks the driver's :class:`NodeKiller`
    to kill its node (the file ``kill-node``) and waits for it."""

    def __init__(
        self,
        directory: str,
        kill_step: int | None,
        kill_rank: int = 1,
        victim_ip: str | None = None,
        kill: str = "process",
    ):
        self.directory, self.kill_step, self.kill_rank = directory, kill_step, kill_rank
        self.victim_ip, self.kill = victim_ip, kill

    def _victim(self, state: FitState) -> bool:
        if self.victim_ip is None:
            return state.rank == self.kill_rank
        return ray.util.get_node_ip_address() == self.victim_ip

    def on_step_end(self, state: FitState) -> None:
        with open(Path(self.directory) / f"rank{state.rank}.jsonl", "a") as f:
            f.write(json.dumps([os.getpid(), state.step, time.time()]) + "\n")
        if (
            state.step == self.kill_step
            and not state.restored
            and state.start_step < self.kill_step
            and self._victim(state)
        ):
            write_text(Path(self.directory) / "killed", json.dumps({"time": time.time(), "rank": state.rank}))
            if self.kill == "process":
                os.kill(os.getpid(), signal.SIGKILL)
            write_text(Path(self.directory) / "kill-node", "")
            time.sleep(600)  # the node dies under it


class NodeKiller:
    """In the driver, a thread that watches ``directory`` for the victim's ``kill-node`` file,
    then kills node ``b`` of the attached two-node link (:func:`raydrat.bench.link.attached`)
    and starts it again, as a replaced machine: Ray Train needs a node with the link's
    resource to place the replacement. ``down_s``: how long the node was gone."""

    def __init__(self, net, directory: str):
        self.net, self.directory = net, Path(directory)
        self.down_s: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raydrat-node-killer", daemon=True)

    def __enter__(self) -> NodeKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if (self.directory / "kill-node").exists():
                t0 = time.time()
                try:
                    self.net.kill_node("b")
                    self.net.start_node("b")
                except BaseException as e:  # the bench reports it after the run
                    self.error = e
                self.down_s = time.time() - t0
                return
            self._stop.wait(0.05)


def _trace(directory: Path, rank: int) -> list[tuple[int, int, float]]:
    path = directory / f"rank{rank}.jsonl"
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def fault_figures(directory: Path, kill_step: int, tokens_per_replica_step: int) -> dict:
    """The figures of a killed run from its step clocks (see the module docstring)."""
    killed = json.loads((directory / "killed").read_text())
    killed_at, victim_rank = killed["time"], killed["rank"]
    survivor, victim = _trace(directory, 1 - victim_rank), _trace(directory, victim_rank)
    steps = [s for _, s, _ in survivor]
    lost = len(steps) - len(set(steps))
    first_pid = victim[0][0]
    back = next((t for pid, _, t in victim if pid != first_pid), None)
    before = [t for _, s, t in survivor if s <= kill_step and t <= killed_at]  # not a restart's repeats
    alone_end = back if back is not None else survivor[-1][2]
    alone = [t for _, _, t in survivor if killed_at <= t <= alone_end]
    return {
        "victim_rank": victim_rank,
        "lost_steps": lost,
        "back_after_s": None if back is None else back - killed_at,
        "before_tokens_per_s": (len(before) - 1) * tokens_per_replica_step / (before[-1] - before[0]),
        "alone_tokens_per_s": (len(alone) - 1) * tokens_per_replica_step / (alone[-1] - alone[0])
        if len(alone) > 1
        else None,
        "rejoined_at_step": next((s for pid, s, _ in victim if pid != first_pid), None),
    }


def fault_variants(sync_steps: tuple[int, ...]) -> list[tuple[str, dict]]:
    out = [("ddp", {"sync.mode": "ddp"})]
    for h in sync_steps:
        base = {"sync.mode": "local", "sync.engine": "torchft", "sync.sync_steps": h}
        out += [(f"torchft local/{h}", base), (f"torchft diloco/{h}", {**base, "sync.outer_optimizer": "nesterov"})]
    return out


def run_fault_bench(
    cfg: RaydratConfig,
    kill_step: int,
    sync_steps: tuple[int, ...],
    json_path: str | None = None,
    kills: tuple[str, ...] = ("process",),
) -> list[dict]:
    """Each variant uninterrupted, then once per kind in ``kills`` killed (see the module
    docstring); one table. Inside a two-node link's command (:func:`link.attached`), the
    victim is the worker on node ``b``, and ``node`` kills that node."""
    net = link.attached()
    bad = [k for k in kills if k not in KILLS]
    if bad or not kills:
        raise ConfigError(f"--kill {','.join(kills)!r}: give process, node or both, e.g. --kill process,node")
    if "node" in kills and net is None:
        raise ConfigError("--kill node kills the remote node of the two-node link: add --link RATE (needs root)")
    rows = []
    tc = cfg.train
    per_replica = tc.batch_size * tc.grad_accum * cfg.model.seq_len
    for label, sets in fault_variants(sync_steps):
        d = cfg.to_dict()
        d["name"] = f"{cfg.name}-faults"
        d["scaling"]["num_workers"] = 2
        d["train"]["max_failures"] = 3
        d["tracking"]["enabled"] = False
        d["sync"] = {k.removeprefix("sync."): v for k, v in sets.items()}
        variant = RaydratConfig.model_validate(d)
        clean: dict = {}
        for kill in (None, *kills):
            figures: dict = {"label": label, "kill": kill, "load_avg": os.getloadavg()[0]}
            with tempfile.TemporaryDirectory(prefix="raydrat-faults-") as tmp:
                clock = StepClock(
                    tmp, kill_step if kill else None, victim_ip=None if net is None else net.ip["b"], kill=kill or ""
                )
                killer = NodeKiller(net, tmp) if kill == "node" else contextlib.nullcontext()
                t0 = time.perf_counter()
                with killer:
                    summary = run_training(variant, fit_callbacks=[clock])
                wall = time.perf_counter() - t0
                if kill is None:
                    clean = {"clean_val_loss": summary.final_val_loss, "clean_wall_s": wall}
                    continue
                if isinstance(killer, NodeKiller):
                    if killer.error is not None:
                        raise killer.error
                    figures["node_down_s"] = killer.down_s
                figures.update(fault_figures(Path(tmp), kill_step, per_replica))
                figures.update(val_loss=summary.final_val_loss, wall_s=wall, **clean)
            figures["val_loss_vs_clean"] = figures["val_loss"] / figures["clean_val_loss"] - 1.0
            figures["load_avg_end"] = os.getloadavg()[0]
            rows.append(figures)
    where = "2 CPU workers on one node" if net is None else f"one worker on each of two nodes, link {_rate(net)}"
    print_fault_table(f"one replica killed after step {kill_step}: {cfg.name}, {where}, {tc.steps} steps", rows)
    if json_path:
        write_json(json_path, rows)
    return rows


def _rate(net) -> str:
    rate = net.applied_rate_mbit(net.namespace["a"])
    return "unlimited" if rate is None else f"{rate:g} Mbit/s"


def print_fault_table(title: str, rows: list[dict]) -> None:
    print_table(
        title,
        [
            "variant",
            "kill",
            "lost steps",
            "back after s",
            "node down s",
            "before tok/s",
            "alone tok/s",
            "val loss",
            "clean",
            "vs clean",
            "wall s",
            "clean wall s",
            "load avg",
        ],
        [
            [
                r["label"],
                r["kill"],
                str(r["lost_steps"]),
                "-" if r["back_after_s"] is None else f"{r['back_after_s']:.1f}",
                "-" if r.get("node_down_s") is None else f"{r['node_down_s']:.1f}",
                f"{r['before_tokens_per_s']:,.0f}",
                "-" if r["alone_tokens_per_s"] is None else f"{r['alone_tokens_per_s']:,.0f}",
                f"{r['val_loss']:.4f}",
                f"{r['clean_val_loss']:.4f}",
                f"{r['val_loss_vs_clean']:+.1%}",
                f"{r['wall_s']:.0f}",
                f"{r['clean_wall_s']:.0f}",
                f"{r['load_avg']:.1f}-{r['load_avg_end']:.1f}",
            ]
            for r in rows
        ],
    )


def run_fault_bench_over_link(
    cfg: RaydratConfig,
    config: str,
    overrides: list[str],
    rates_mbit: list[float],
    kill_step: int,
    sync_steps: tuple[int, ...],
    kills: tuple[str, ...] = KILLS,
    json_path: str | None = None,
) -> list[dict]:
    """``raydrat bench sync --faults STEP --link RATE``: :func:`run_fault_bench` as the
    driver inside the head node's namespace of a two-node link, one worker per node, the
    victim the worker on the other node (its process, then the whole node); once per rate."""
    reason = link.unavailable_reason()
    if reason:
        raise ConfigError(f"--faults with --link: {reason}: drop --link to kill a worker process on one node")
    args = ["--faults", str(kill_step), "--kill", ",".join(kills), "--sync-steps", ",".join(map(str, sync_steps))]
    rows = run_over_link(cfg, config, overrides, rates_mbit, args, quiet=False)
    if json_path:
        write_json(json_path, rows)
    return rows
