"""``raydrat bench resume``: the time from ``--resume`` to the first resumed step, with the
data position at 10%, 50% and 90% of an epoch of a generated corpus (``--mb``, at least 100
MB of text), and whether the resumed run trained on the right blocks, at the same worker count
and at another; with ``--before DIR`` (a checkout of the code this replaced, e.g. ``git
worktree add DIR round-start``), the same resumes of that code beside it.

Each row: a one-step run saves a checkpoint; its data position is set to the position of the
row (this code: the position the global order reaches there, computed by walking the order
from its start; the code before: each rank's micro-batch count); the run record asks for two
more steps; ``raydrat``'s ``run_training(resume_run=...)`` continues it in a fresh process,
timed from the call to the end of the first resumed step (Ray's start, the up-front check,
the workers' start and the data's resume included, as a user's ``--resume`` sees them).
The blocks the resumed run trained on (each worker's trace of ``(position, block id)``) are
compared with those the order holds there: *repeated* are blocks the world had consumed
before the position, *skipped* blocks of the order it did not train on.

Runs of both codes go through the same small driver script (it uses only what both have:
``load_config``, ``run_training`` and a ``fit`` callback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from raydrat.bench.ingest import generate_corpus
from raydrat.bench.report import load_average, print_table, write_json
from raydrat.config import RaydratConfig, load_config
from raydrat.core.checkpoint.state import POSITION_FILE, write_manifest
from raydrat.core.data.blocks import UnitStart
from raydrat.core.data.position import DataPosition
from raydrat.core.data.sample import train_tokenizer_on_sources
from raydrat.core.data.stream import TrainSource, WorkerBlocks, local_source
from raydrat.ray_train.resume import RUN_FILE, checkpoint_dirs

RESUMED_STEPS = 2
"""Steps each resumed run trains (the first is timed)."""

DRIVER = """
import json, sys, time
from raydrat.config import load_config
from raydrat.core.fit import Callback
from raydrat.ray_train.trainer import run_training


class Steps(Callback):
    def __init__(self, out):
        self.out = out

    def on_fit_start(self, state):
        if hasattr(state.position, "trace"):
            state.position.trace = []

    def on_step_end(self, state):
        record = {"rank": state.rank, "step": state.step, "time": time.time()}
        trace = getattr(state.position, "trace", None)
        if trace is not None:
            record["blocks"] = [list(t) for t in trace]
            trace.clear()
        with open(f"{self.out}-rank{state.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\\n")


args = json.loads(sys.argv[1])
cfg = load_config(args["config"], args["overrides"])
t0 = time.time()
run_training(cfg, resume_run=args["resume"], fit_callbacks=[Steps(args["out"])])
print(json.dumps({"t0": t0}))
"""


def _drive(code: Path, tmp: Path, config: str, overrides: list[str], resume: str | bool, out: Path) -> float:
    """Run the driver with the raydrat at ``code``; the call's start time."""
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    args = json.dumps({"config": config, "overrides": overrides, "resume": resume, "out": str(out)})
    res = subprocess.run(
        [sys.executable, str(script), args], cwd=tmp, env=env, capture_output=True, text=True, timeout=3600
    )
    if res.returncode != 0:
        raise RuntimeError(f"the driver failed ({code}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["t0"]


def _steps(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for p in sorted(out.parent.glob(f"{out.name}-rank*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def _rewrite_manifest(ckpt: Path, rank: int, world: int, step: int, extra: list[str]) -> None:
    """Rank ``rank``'s manifest again, listing its files with their new sizes and checksums."""
    manifest = json.loads((ckpt / f"manifest-rank{rank}.json").read_text())
    files = sorted({*manifest["files"], *extra})
    write_manifest(ckpt, rank, world, step, files)


def _set_position(run_dir: Path, after: bool, position: DataPosition, batches: int, world: int) -> None:
    """Set the data position of the run's one checkpoint: this code's global position (all
    its streams in rank 0's file), or the earlier code's per-rank micro-batch count."""
    (ckpt,) = checkpoint_dirs(run_dir)
    for rank in range(world):
        if after:
            part = position if rank == 0 else DataPosition(position.blocks, {}, position.stream_count, position.units)
            name = POSITION_FILE.format(rank=rank)
            (ckpt / name).write_text(json.dumps(part.to_json()))
            _rewrite_manifest(ckpt, rank, world, 1, [name])
        else:
            path = ckpt / f"rank{rank}.pt"
            state = torch.load(path, map_location="cpu", weights_only=False)
            state["data"] = {"epoch": 0, "batches": batches}
            torch.save(state, path)
            _rewrite_manifest(ckpt, rank, world, 1, [])
    record = json.loads((run_dir / RUN_FILE).read_text())
    record["config"]["train"]["steps"] = 1 + RESUMED_STEPS
    (run_dir / RUN_FILE).write_text(json.dumps(record, indent=2))


def _walk(source: TrainSource, seed: int, targets: list[int], batch: int) -> dict[int, dict]:
    """For each target position (ascending): the position there, the ``(id, epoch)`` of the
    blocks before it, and those of the next ``batch`` blocks (the order, walked from 0)."""
    walk = WorkerBlocks(source, seed, DataPosition(), batch_size=batch)
    seen: set[tuple[int, int]] = set()
    out = {}
    for n in sorted(targets):
        seen.update(walk.advance(n))
        position = walk.position()
        nxt = next(walk)
        following = dict(
            zip(nxt.positions.tolist(), zip(nxt.ids.tolist(), nxt.epochs.tolist(), strict=True), strict=True)
        )
        out[n] = {"position": position, "before": set(seen), "next": following}
        seen.update(following.values())
    return out


def _resume_row(
    code: Path,
    tmp: Path,
    config: str,
    base: list[str],
    name: str,
    label: str,
    walked: dict,
    n: int,
    w0: int,
    w1: int,
    batch: int,
) -> dict:
    """One resume of the code at ``code`` from position ``n``, ``w0`` workers then ``w1``."""
    cpus = "1" if w0 < 3 else "0.66"
    first = [*base, f"scaling.num_workers={w0}", f"scaling.cpus_per_worker={cpus}", "train.steps=1"]
    _drive(code, tmp, config, [*first, f"tracking.run_name={name}"], False, tmp / f"{name}-first")
    _set_position(tmp / "runs" / name, label == "after", walked["position"], n // (w0 * batch), w0)
    cpus = "1" if w1 < 3 else "0.66"
    again = [*base, f"scaling.num_workers={w1}", f"scaling.cpus_per_worker={cpus}", f"train.steps={1 + RESUMED_STEPS}"]
    out = tmp / f"{name}-resumed"
    t0 = _drive(code, tmp, config, again, name, out)
    steps = _steps(out)
    result = {"resume_s": min(s["time"] for s in steps if s["step"] == 2) - t0}
    if label == "after":
        got = [tuple(b) for s in steps for b in s.get("blocks", [])]
        kept = {p: (i, e) for p, i, e in got}
        result["blocks"] = len(got)
        result["repeated"] = sum(1 for _, i, e in got if (i, e) in walked["before"])
        result["skipped"] = sum(1 for p in range(n, n + len(got)) if kept.get(p) != walked["next"].get(p))
    return result


def _epoch_blocks(source: TrainSource, sample: int = 6) -> int:
    """An epoch's training blocks, estimated from ``sample`` units spread over the corpus."""
    units = source.units
    picks = [units[i * len(units) // sample] for i in range(sample)]
    per_unit = [sum(len(r.ids) for r in source.runs(u, UnitStart(), {})) for u in picks]
    return round(sum(per_unit) / len(per_unit) * len(units))


def run_resume_bench(
    config: str,
    overrides: list[str],
    mb: float = 100.0,
    positions: tuple[float, ...] = (0.1, 0.5, 0.9),
    changes: tuple[tuple[int, int], ...] = ((2, 1), (1, 2), (2, 3)),
    before: str | None = None,
    json_path: str | None = None,
    workdir: str | None = None,
) -> dict:
    """The benchmark (see the module docstring); ``changes``: worker counts before and
    after, run at the middle position."""
    here = Path(__file__).resolve().parents[2]
    load_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="raydrat-bench-resume-") as t:
        tmp = Path(t)
        corpus = generate_corpus(tmp / "corpus", mb)
        tok = tmp / "tokenizer.json"
        probe: RaydratConfig = load_config(config, [*overrides, f"data.sources=[{{path: {corpus}}}]"])
        probe.data.tokenizer_sample_docs = 4000
        train_tokenizer_on_sources(probe.data, probe.model.vocab_size, str(tok))
        base = [
            *overrides,
            f"data.sources=[{{path: {corpus}}}]",
            f"data.tokenizer_path={tok}",
            "data.val_max_units=4",
            "tracking.enabled=false",
            f"train.storage_path={tmp / 'runs'}",
            "train.eval_every=1000",
            "train.log_every=1",
            "optim.warmup_steps=1",
        ]
        cfg = load_config(config, [*base, f"train.steps={1 + RESUMED_STEPS}"])
        source = local_source(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)
        epoch = _epoch_blocks(source)
        batch = cfg.train.batch_size
        plan = [(p, 1, 1) for p in positions] + [(0.5, a, b) for a, b in changes]
        targets = {p: int(p * epoch) // (6 * batch) * (6 * batch) for p, _, _ in plan}  # whole micro-rounds
        t_walk = time.perf_counter()
        walked = _walk(source, cfg.train.seed, sorted(set(targets.values())), 3 * batch * RESUMED_STEPS)
        walk_s = time.perf_counter() - t_walk
        codes = [("after", here)] + ([("before", Path(before).resolve())] if before else [])
        for k, (frac, w0, w1) in enumerate(plan):
            n = targets[frac]
            row = {"position": frac, "blocks": n, "epoch_blocks": epoch, "workers": f"{w0} -> {w1}"}
            for label, code in codes:
                if label == "before" and w0 != w1:
                    row[label] = {"refused": "a changed scaling.num_workers is refused by --resume"}
                    continue
                try:
                    row[label] = _resume_row(
                        code, tmp, config, base, f"r{k}-{label}", label, walked[n], n, w0, w1, batch
                    )
                except Exception as exc:  # one row's failure is reported, the others still run
                    row[label] = {"error": str(exc).strip().splitlines()[-1][:300]}
            rows.append(row)
            print(f"bench resume: {row}", flush=True)
            if json_path:
                write_json(json_path, {"config": config, "mb": mb, "rows": rows, "partial": True})
    load_end = load_average()
    table = []
    for r in rows:
        b, a = r.get("before", {}), r["after"]
        if "error" in a:
            a = {"resume_s": float("nan"), "repeated": a["error"], "skipped": "-", "blocks": "-"}
        table.append(
            [
                f"{r['position']:.0%} ({r['blocks']:,} of ~{r['epoch_blocks']:,})",
                r["workers"],
                (b.get("refused") or b.get("error") or f"{b['resume_s']:.1f}") if b else "-",
                f"{a['resume_s']:.1f}",
                a["repeated"],
                a["skipped"],
                a["blocks"],
            ]
        )
    print_table(
        f"resume: {config}, {mb:g} MB corpus, batch {batch} x seq_len {cfg.model.seq_len}; load average "
        f"{load_start} (start), {load_end} (end)",
        [
            "position (blocks)",
            "workers",
            "before: resume s",
            "after: resume s",
            "after: repeated",
            "after: skipped",
            "after: blocks checked",
        ],
        table,
        footer=f"resume s: from run_training(resume_run=...) to the end of the first resumed step; "
        f"the positions of this code were found by walking the order from its start ({walk_s:.0f}s). "
        "Goal: 90% within 1.2x of 10%.",
    )
    figures = {"config": config, "mb": mb, "rows": rows, "load_average": [load_start, load_end], "walk_s": walk_s}
    if json_path:
        write_json(json_path, figures)
    return figures
