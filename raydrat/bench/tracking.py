"""``raydrat bench tracking``: many writers logging metrics into one ``mlflow server``, its
backend store SQLite against PostgreSQL.

What a cluster does to its tracking server: every training run (and every trial of a sweep)
logs its metrics from its own process, all at once. The bench starts two ``mlflow server``
instances with the same options (``--workers``, a proxied artifact destination), one on an
SQLite file, one on a throwaway PostgreSQL server (:mod:`raydrat.bench.pgserver`); then,
for each writer count, interleaved (SQLite, PostgreSQL, next count), ``N`` writers log at
once, after a warm-up (each server worker opens its store on its first requests).

A writer is what a training run's rank-0 worker is: a process holding a
:class:`raydrat.tracking.Run` of its own (a child of one parent run per measurement, as a
sweep's trials are), which calls :meth:`~raydrat.tracking.Run.log_metrics` with ``keys``
metrics for each of ``steps`` training steps of ``step_s`` seconds each, then waits for its
run's writer to deliver everything (:meth:`~raydrat.tracking.Run.close`) and ends the run.
The calls never wait on the store: the run's writer thread sends the records in order, one
``log_batch`` request per step while the store keeps up, consecutive steps as one request
when it falls behind (at most 1000 metrics a request), and tries again with a backoff when a
request fails (MLflow's own HTTP retries are off). Counted per backend and ``N``:

* ``metrics/s``: metrics the store took, over the wall time from the start signal to the
  last writer's delivery of all it logged (at most ``N * keys / step_s``: the writers' own
  pace);
* ``requests``: the ``log_batch`` requests that carried them: ``N * steps`` when the store
  kept up with every writer, fewer when it fell behind and steps went together;
* ``behind s``: the longest a writer waited, after its last step, for the store to take
  everything it logged;
* ``failed``: requests that failed (the store unreachable, overloaded or timing out), each
  tried again;
* ``refused``: steps the store refused (dropped), and ``left``: steps still undelivered when
  the writer gave up waiting (kept in its backlog);
* ``lost``: metrics logged that are not in the store when read back (every key of every
  run), whatever the writer was told.

The load average is printed beside the table (a shared machine).
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from raydrat.bench.loopback import MlflowServer
from raydrat.bench.pgserver import LocalPostgres
from raydrat.bench.report import load_average, print_table
from raydrat.tables import write_json
from raydrat.tracking import Run

BACKENDS = ("sqlite", "postgresql")
DELIVERY_TIMEOUT_S = 900.0
"""How long a writer waits for its run's records to be delivered once it has logged them all."""


def _writer(url: str, experiment: str, parent_id: str, backlog: str, index: int, steps: int, keys: int,
            step_s: float, ready, go, results) -> None:  # fmt: skip
    """One writer process (see the module): a run of its own, ``steps`` steps of ``keys``
    metrics logged one every ``step_s`` seconds, then everything delivered."""
    run = Run.start(url, experiment, f"writer-{index}", parent=Run.attach(url, parent_id), backlog=backlog)
    ready.put(index)
    go.wait()
    t0 = time.perf_counter()
    for step in range(steps):
        time.sleep(max(0.0, t0 + (step + 1) * step_s - time.perf_counter()))  # the step's computation
        run.log_metrics({f"metric_{k:02d}": float(step * keys + k) for k in range(keys)}, step)
    logged = time.perf_counter()
    left = run.close(DELIVERY_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    done = run.deliveries()
    run.end()
    results.put({"run_id": run.run_id, "acked": (steps - left - done.refused) * keys, "left": left,
                 "requests": done.requests, "failed": done.failed, "refused": done.refused,
                 "first_error": done.first_error, "seconds": seconds,
                 "behind_s": time.perf_counter() - logged})  # fmt: skip


def measure(url: str, writers: int, steps: int, keys: int, step_s: float, experiment: str, backlog: Path) -> dict:
    """``writers`` processes logging into the server at ``url`` at once; the figures."""
    parent = Run.start(url, experiment, experiment)
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_writer,
            args=(
                url,
                experiment,
                parent.run_id,
                str(backlog / f"{experiment}-{i}"),
                i,
                steps,
                keys,
                step_s,
                ready,
                go,
                results,
            ),  # fmt: skip
        )
        for i in range(writers)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    t0 = time.perf_counter()
    go.set()
    done = [results.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    parent.end()
    found = sum(
        len({step for step, _ in Run.attach(url, d["run_id"]).metric_history(f"metric_{k:02d}")})
        for d in done
        for k in range(keys)
    )
    sent = writers * steps * keys
    acked = sum(d["acked"] for d in done)
    return {
        "writers": writers,
        "metrics_sent": sent,
        "metrics_acked": acked,
        "metrics_per_s": acked / wall if wall else 0.0,
        "requests": sum(d["requests"] for d in done),
        "failed": sum(d["failed"] for d in done),
        "refused": sum(d["refused"] for d in done),
        "left": sum(d["left"] for d in done),
        "behind_s": max(d["behind_s"] for d in done),
        "lost": sent - found,
        "wall_s": wall,
        "first_error": next((d["first_error"] for d in done if d["first_error"]), ""),
    }


def run_tracking_bench(
    writers: Sequence[int] = (1, 4, 8),
    steps: int = 100,
    keys: int = 10,
    step_s: float = 0.02,
    server_workers: int = 4,
    json_path: str | None = None,
) -> list[dict]:
    """The table: for each writer count, SQLite then PostgreSQL behind ``mlflow server``."""
    load_start = load_average()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="raydrat-bench-tracking-") as tmp, ExitStack() as stack:
        pg = stack.enter_context(LocalPostgres())
        servers = {
            "sqlite": stack.enter_context(
                MlflowServer(Path(tmp, "sqlite"), f"sqlite:///{tmp}/sqlite/mlruns.db", server_workers)
            ),
            # the password reaches the server as PGPASSWORD, never on its command line
            "postgresql": stack.enter_context(
                MlflowServer(
                    Path(tmp, "postgresql"),
                    pg.uri().replace(f":{pg.password}@", "@"),
                    server_workers,
                    env={"PGPASSWORD": pg.password},
                )
            ),
        }
        backlog = Path(tmp, "backlogs")
        for backend in BACKENDS:  # every server worker opens its store on its first requests: not timed
            measure(servers[backend].url, 2 * server_workers, 5, keys, step_s, f"warm-up-{backend}", backlog)
        for n in writers:
            for backend in BACKENDS:
                row = measure(servers[backend].url, n, steps, keys, step_s, f"bench-{backend}-{n}", backlog)
                row = {"backend": backend, **row}
                print(
                    f"[raydrat] {backend}: {n} writer(s): {row['metrics_per_s']:,.0f} metrics/s in "
                    f"{row['requests']} requests, {row['behind_s']:.1f}s behind, {row['failed']} failed, "
                    f"{row['refused']} refused, {row['lost']} lost ({load_average()})",
                    flush=True,
                )
                rows.append(row)
    load_end = load_average()
    print_table(
        f"mlflow server ({server_workers} workers) on SQLite vs PostgreSQL: each writer a raydrat Run logging "
        f"{steps} steps of {keys} metrics, a step every {step_s * 1000:g} ms",
        [
            "backend",
            "writers",
            "metrics/s",
            "requests",
            "behind s",
            "failed",
            "refused",
            "left",
            "lost",
            "wall s",
            "first error",
        ],  # fmt: skip
        [
            [
                r["backend"],
                r["writers"],
                f"{r['metrics_per_s']:,.0f}",
                r["requests"],
                f"{r['behind_s']:.1f}",
                r["failed"],
                r["refused"],
                r["left"],
                r["lost"],
                f"{r['wall_s']:.1f}",
                r["first_error"][:80],
            ]  # fmt: skip
            for r in rows
        ],
        footer=f"load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end",
    )
    if json_path:
        write_json(
            json_path,
            {
                "rows": rows,
                "steps": steps,
                "keys": keys,
                "step_s": step_s,
                "server_workers": server_workers,
                "load_average_start": load_start,
                "load_average_end": load_end,
            },  # fmt: skip
        )
    return rows
