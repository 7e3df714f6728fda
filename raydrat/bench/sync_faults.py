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
* ``val loss`` at the end against the uninterrupted run's (equal steps, so equal tokens).

On one node (loopback): killing a whole node needs the two-node harness of ``--link``.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

from raydrat.bench.report import print_table
from raydrat.config import RaydratConfig
from raydrat.core.fit import Callback, FitState
from raydrat.ray_train.trainer import run_training
from raydrat.tables import write_json


class StepClock(Callback):
    """Every rank appends ``[pid, step, unix time]`` after each step to
    ``directory/rank{r}.jsonl``; rank ``kill_rank`` of a group that did not start from a
    checkpoint, and did not join later, SIGKILLs its own process after step ``kill_step``."""

    def __init__(self, directory: str, kill_step: int | None, kill_rank: int = 1):
        self.directory, self.kill_step, self.kill_rank = directory, kill_step, kill_rank

    def on_step_end(self, state: FitState) -> None:
        with open(Path(self.directory) / f"rank{state.rank}.jsonl", "a") as f:
            f.write(json.dumps([os.getpid(), state.step, time.time()]) + "\n")
        if (
            state.step == self.kill_step
            and state.rank == self.kill_rank
            and not state.restored
            and state.start_step < self.kill_step
        ):
            with open(Path(self.directory) / "killed", "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


def _trace(directory: Path, rank: int) -> list[tuple[int, int, float]]:
    path = directory / f"rank{rank}.jsonl"
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def fault_figures(directory: Path, kill_step: int, tokens_per_replica_step: int) -> dict:
    """The figures of a killed run from its step clocks (see the module docstring)."""
    survivor, victim = _trace(directory, 0), _trace(directory, 1)
    killed_at = float((directory / "killed").read_text())
    steps = [s for _, s, _ in survivor]
    lost = len(steps) - len(set(steps))
    first_pid = victim[0][0]
    back = next((t for pid, _, t in victim if pid != first_pid), None)
    before = [t for _, s, t in survivor if s <= kill_step]
    alone_end = back if back is not None else survivor[-1][2]
    alone = [t for _, _, t in survivor if killed_at <= t <= alone_end]
    return {
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
    cfg: RaydratConfig, kill_step: int, sync_steps: tuple[int, ...], json_path: str | None = None
) -> list[dict]:
    """Each variant uninterrupted, then killed (see the module docstring); one table."""
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
        figures: dict = {"label": label, "load_avg": os.getloadavg()[0]}
        for killed in (False, True):
            with tempfile.TemporaryDirectory(prefix="raydrat-faults-") as tmp:
                t0 = time.perf_counter()
                summary = run_training(variant, fit_callbacks=[StepClock(tmp, kill_step if killed else None)])
                wall = time.perf_counter() - t0
                if killed:
                    figures.update(fault_figures(Path(tmp), kill_step, per_replica))
                    figures.update(val_loss=summary.final_val_loss, wall_s=wall)
                else:
                    figures.update(clean_val_loss=summary.final_val_loss, clean_wall_s=wall)
        figures["val_loss_vs_clean"] = figures["val_loss"] / figures["clean_val_loss"] - 1.0
        figures["load_avg_end"] = os.getloadavg()[0]
        rows.append(figures)
    print_table(
        f"one replica killed after step {kill_step}: {cfg.name}, 2 CPU workers on one node, {tc.steps} steps",
        [
            "variant",
            "lost steps",
            "back after s",
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
                str(r["lost_steps"]),
                "-" if r["back_after_s"] is None else f"{r['back_after_s']:.1f}",
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
    if json_path:
        write_json(json_path, rows)
    return rows
