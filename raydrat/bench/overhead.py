"""``raydrat bench overhead``: what Ray Train costs over a bare PyTorch loop.

Same model, same evaluation, checkpoint and logging schedule, same thread count:

(a) ``raydrat train``'s loop on one Ray Train worker (its training stream read in a thread
    of the worker, ``ray.train.report`` with checkpoints, MLflow metrics from rank 0);
(b) the same ``fit`` loop over blocks tokenized beforehand (loading them is not timed),
    evaluating and ``torch.save``-ing a checkpoint at the same steps, with no Ray Train, no
    data stream, no report and no MLflow: run in a plain Ray task, so that both loops run in
    the same kind of process (Ray starts its workers at niceness 15, with its own thread
    settings, and a loaded machine's scheduler treats such a process unlike the driver).

Both run :func:`raydrat.core.fit.fit`; the difference is only what Ray Train adds around it.

**Rounds.** A round is one run of each, in alternating order (Ray first in even rounds,
the bare loop first in odd ones), so both see the same machine load; the ratio is taken
round by round and summarised as median and min-max over at least
:data:`~raydrat.bench.rounds.MIN_ROUNDS` rounds (:mod:`raydrat.bench.rounds`).

**The measuring window.** Each run is timed inside the process that trains
(:class:`~raydrat.bench.window.Window`), from the end of step ``--from-step`` to the end of
its last step: past Ray's start-up, the worker's set-up and its data stream's start-up
(the first shuffle window of every stream read), and past the bare loop's up-front
tokenization; every step, wait for data, log line, evaluation and checkpoint in between
counts. Two clocks: wall time (the verdict's: waiting on data, on the report and on the
checkpoint upload is what Ray can add) and the loop process's CPU time (the Ray worker's
includes its data thread, which the bare loop does not have). Wall time from the start of
each run (Ray's start-up included) is printed beside them.

Cost: ``rounds`` x (a Ray Train run + a bare run) of ``--steps`` steps; the default (5
rounds of 100 demo steps) takes about 6 minutes on 2 idle cores, 12 on loaded ones.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import ray

from raydrat.bench import rounds as R
from raydrat.bench.local import LocalData, LocalRun
from raydrat.bench.report import print_table
from raydrat.bench.window import Window, WindowSink
from raydrat.config import RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.callbacks import LocalCheckpoint
from raydrat.ray_session import ensure_ray
from raydrat.ray_train.trainer import run_training
from raydrat.tables import write_json

GOAL = 0.95
"""Ray Train's tokens/s over the bare loop's that the benchmark holds it to."""
STEPS = 100
"""Steps per run: two evaluations and checkpoints at the demo recipe's ``eval_every`` 50."""
FROM_STEP = 10
"""The step whose end starts the measuring window."""
RAY, BARE = "Ray Train (1 worker)", "bare PyTorch"


def bare_run(cfg: RaydratConfig, data: LocalData, start: int) -> dict:
    """The baseline: the same ``fit`` in the calling process, over blocks tokenized beforehand,
    checkpointing with ``torch.save`` at the same steps."""
    window = Window(start)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = LocalRun.start(cfg, data, [LocalCheckpoint(tmp, cfg.to_dict()), window]).run()
    return {**window.figures, "run_wall_s": time.perf_counter() - t0, "val_loss": run.state.last_report[M.VAL_LOSS]}


@ray.remote(max_retries=0)
def _bare_task(config: dict, data: LocalData, start: int) -> dict:
    return bare_run(RaydratConfig.model_validate(config), data, start)


def bare_in_worker(cfg: RaydratConfig, data, start: int) -> dict:
    """:func:`bare_run` in a Ray worker process holding the CPUs a Ray Train worker holds."""
    task = _bare_task.options(num_cpus=cfg.scaling.cpus_per_worker)
    return ray.get(task.remote(cfg.to_dict(), data, start))


def ray_run(cfg: RaydratConfig, start: int, sink, key: str) -> dict:
    """One ``raydrat train`` run of ``cfg`` on Ray Train, its window read in the worker."""
    summary = run_training(cfg, fit_callbacks=[Window(start, sink, key)])
    figures = ray.get(sink.get.remote(key))
    if not figures:
        raise RuntimeError(f"the Ray Train run {summary.run_name} reported no measuring window")
    return {**figures, "run_wall_s": summary.wall_s, "val_loss": summary.final_val_loss}


def check_window(steps: int, start: int) -> None:
    if not 1 <= start < steps:
        raise ValueError(f"--from-step {start} must be at least 1 and below --steps {steps}")


def run_overhead(
    cfg: RaydratConfig,
    rounds: int = R.MIN_ROUNDS,
    steps: int = STEPS,
    start: int = FROM_STEP,
    json_path: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    R.check_rounds(rounds)
    check_window(steps, start)
    cfg = cfg.model_copy(deep=True)
    cfg.train.steps = steps
    cfg.tracking.experiment = "raydrat-bench"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log(
        f"overhead: {cfg.name}, {rounds} rounds of a Ray Train run and a bare run, {steps} steps each, "
        f"measured from the end of step {start} (past both loops' data start-up) to the end of step {steps}"
    )
    ensure_ray()
    data = ray.put(LocalData.load(cfg))
    sink = WindowSink.remote()
    load = R.Load()
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {RAY: [], BARE: []}
    for r in range(rounds):
        order = (RAY, BARE) if r % 2 == 0 else (BARE, RAY)
        for name in order:
            if name == RAY:
                cfg.tracking.run_name = f"overhead-{stamp}-r{r}"
                runs[RAY].append(ray_run(cfg, start, sink, f"r{r}"))
            else:
                runs[BARE].append(bare_in_worker(cfg, data, start))
        ray_tps, bare_tps = (runs[n][-1]["tokens"] / runs[n][-1]["wall_s"] for n in (RAY, BARE))
        log(
            f"  round {r + 1}/{rounds} ({' then '.join(order)}): {ray_tps:,.0f} vs {bare_tps:,.0f} tokens/s, "
            f"ratio {ray_tps / bare_tps:.3f}"
        )
    load.finish()
    figures = summarise(runs, cfg, rounds, start, load, time.perf_counter() - t0)
    print_summary(figures)
    if json_path:
        write_json(json_path, figures)
    return figures


def series_of(name: str, runs: list[dict]) -> R.Series:
    """Seconds per step of each run's window, one run per round."""
    series = R.Series(name)
    for run in runs:
        series.add(run["wall_s"] / run["steps"], run["cpu_s"] / run["steps"])
    return series


def summarise(runs: dict[str, list[dict]], cfg: RaydratConfig, rounds: int, start: int, load: R.Load, took: float):
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
    series = {name: series_of(name, rs) for name, rs in runs.items()}
    ratio = {c: R.speed_ratio(series[RAY], series[BARE], c) for c in R.CLOCKS}
    verdicts = {
        c: R.verdict(ratio[c], GOAL, f"within {1 - GOAL:.0%} of the bare loop", f"more than {1 - GOAL:.0%} slower")
        for c in R.CLOCKS
    }
    loops = {}
    for name, rs in runs.items():
        loops[name] = {
            "tokens_per_s": series[name].rate(tokens, "wall").as_dict(),
            "cpu_tokens_per_s": series[name].rate(tokens, "cpu").as_dict(),
            "data_wait_s": R.Spread.of([x["data_wait_s"] for x in rs]).as_dict(),
            "data_wait_before_s": R.Spread.of([x["data_wait_before_s"] for x in rs]).as_dict(),
            "other_threads_cpu_s": R.Spread.of([x["other_threads_cpu_s"] for x in rs]).as_dict(),
            "run_wall_s": R.Spread.of([x["run_wall_s"] for x in rs]).as_dict(),
            "val_loss": statistics.median(x["val_loss"] for x in rs),
            "runs": rs,
        }
    return {
        "config": cfg.name,
        "steps": cfg.train.steps,
        "from_step": start,
        "rounds": rounds,
        "threads": cfg.scaling.cpus_per_worker,
        "ray_tokens_per_s": loops[RAY]["tokens_per_s"]["median"],
        "bare_tokens_per_s": loops[BARE]["tokens_per_s"]["median"],
        "ratio": ratio["wall"].median,
        "ratio_range": [ratio["wall"].low, ratio["wall"].high],
        "cpu_ratio": ratio["cpu"].median,
        "cpu_ratio_range": [ratio["cpu"].low, ratio["cpu"].high],
        "goal": GOAL,
        "verdict": verdicts["wall"].holds,
        "verdict_text": verdicts["wall"].text,
        "cpu_verdict": verdicts["cpu"].holds,
        "cpu_verdict_text": verdicts["cpu"].text,
        "loops": loops,
        "load_average": load.as_list(),
        "load_text": load.text(),
        "bench_s": took,
    }


def print_summary(f: dict) -> None:
    def spread(d: dict, fmt: str = "{:,.0f}") -> str:
        return R.Spread(d["median"], d["min"], d["max"], d["rounds"]).text(fmt, "")

    rows = [
        [
            name,
            spread(loop["tokens_per_s"]),
            spread(loop["cpu_tokens_per_s"]),
            spread(loop["data_wait_s"], "{:.1f}"),
            spread(loop["data_wait_before_s"], "{:.1f}"),
            spread(loop["other_threads_cpu_s"], "{:.1f}"),
            spread(loop["run_wall_s"], "{:.1f}"),
            f"{loop['val_loss']:.4f}",
        ]
        for name, loop in f["loops"].items()
    ]
    wall, cpu = (R.Spread(f[k], *f[f"{k}_range"], f["rounds"]).text() for k in ("ratio", "cpu_ratio"))
    print_table(
        f"overhead: {f['config']}, {f['rounds']} rounds, {f['steps']} steps a run, {f['threads']:g} CPU thread(s), "
        f"measured from the end of step {f['from_step']} to the end of step {f['steps']}",
        [
            "loop",
            "tokens/s, wall",
            "tokens/s, CPU time",
            "data wait s (window)",
            "data wait s (before it)",
            "CPU s of other threads (window)",
            "run wall s (with start-up)",
            "val loss",
        ],
        rows,
        footer=(
            f"measured from the end of step {f['from_step']}: past both loops' data start-up (Ray: the worker's "
            "set-up and its stream's first shuffle windows; bare: blocks tokenized before the run), every "
            "step, log line, evaluation and checkpoint after it counted. Median (min-max) over the rounds; a "
            "round is one run of each loop, in alternating order. CPU s of other threads: the loop process's "
            "CPU time outside its training thread (Ray: the stream's reader, the MLflow writer, Ray's own threads).\n"
            f"ratio Ray/bare tokens/s, wall: {wall}; CPU time of the loop's process: {cpu} (goal >= {f['goal']:g})\n"
            f"verdict (wall): {f['verdict_text']}; (CPU time): {f['cpu_verdict_text']}\n"
            f"{R.VERDICT_RULE.format(goal=f['goal'])}.\n{f['load_text']}; {f['bench_s']:.0f}s in all"
        ),
    )
