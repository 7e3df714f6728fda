"""``raydrat bench tracking``: many writers logging metrics into one ``mlflow server``, its
backend store SQLite against PostgreSQL.

What a cluster does to its tracking server: every training run (and every trial of a sweep)
logs its metrics from its own process, all at once. The bench starts two ``mlflow server``
instances with the same options (``--workers``, a proxied artifact destination), one on an
SQLite file, one on a throwaway PostgreSQL server (:mod:`raydrat.bench.pgserver`); then,
for each writer count, interleaved (SQLite, PostgreSQL, next count), ``N`` processes each
create a run and log ``steps`` batches of ``keys`` metrics (``log_batch``, what a training
worker sends per step) as fast as the server takes them, through MLflow's own client with its
own retries (after a warm-up: each server worker opens its store on its first requests).
Counted per backend and ``N``:

* ``metrics/s``: metrics acknowledged by the server over the wall time from the start signal
  to the last writer's end;
* ``errors``: ``log_batch`` calls that failed after the client's retries;
* ``lost``: metrics sent that are not in the store when read back (``get_metric_history``
  of every key of every run), whatever the writer was told.

The load average is printed beside the table (a shared machine).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from raydrat.bench.pgserver import LocalPostgres, free_port
from raydrat.bench.report import load_average, print_table
from raydrat.tables import write_json

BACKENDS = ("sqlite", "postgresql")
RETRIES = 3
"""``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` of the writers (MLflow's default is 7, with backoff
doubling from 2 s: a store that keeps failing would hold a writer for minutes per call)."""


class MlflowServer:
    """``mlflow server`` on loopback: ``backend_uri`` as its store, artifacts proxied to a
    folder under ``root``; ``env`` adds to its environment (a database password)."""

    def __init__(self, backend_uri: str, root: Path, workers: int = 4, env: dict[str, str] | None = None):
        self.backend_uri, self.root, self.workers, self.env = backend_uri, Path(root), workers, env or {}
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        exe = str(Path(sys.executable).with_name("mlflow"))
        cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
               "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        self.log = self.root / "server.log"
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env={**os.environ, **self.env},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn workers go with it
        )
        deadline = time.monotonic() + 300  # four workers importing MLflow on a loaded machine
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"mlflow server did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _writer(url: str, experiment_id: str, index: int, steps: int, keys: int, ready, go, results) -> None:
    """One writer process: a run of its own, then ``steps`` log_batch calls of ``keys``
    metrics each, as fast as they return."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(RETRIES)
    client = MlflowClient(tracking_uri=url)
    run_id = client.create_run(experiment_id, run_name=f"writer-{index}").info.run_id
    ready.put(index)
    go.wait()
    ok = errors = 0
    first_error = ""
    t0 = time.perf_counter()
    for step in range(steps):
        ts = int(time.time() * 1000)
        batch = [Metric(f"metric_{k:02d}", float(step * keys + k), ts, step) for k in range(keys)]
        try:
            client.log_batch(run_id, metrics=batch)
            ok += len(batch)
        except Exception as exc:  # whatever the client raises after its retries is an error here
            errors += 1
            first_error = first_error or " ".join(str(exc).split())[:200]
    results.put({"run_id": run_id, "acked": ok, "errors": errors, "first_error": first_error,
                 "seconds": time.perf_counter() - t0})  # fmt: skip


def measure(url: str, writers: int, steps: int, keys: int, experiment: str) -> dict:
    """``writers`` processes logging into the server at ``url`` at once; the figures."""
    client = MlflowClient(tracking_uri=url)
    exp_id = client.create_experiment(experiment)
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_writer, args=(url, exp_id, i, steps, keys, ready, go, results)) for i in range(writers)
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
    found = sum(
        len({m.step for m in client.get_metric_history(d["run_id"], f"metric_{k:02d}")})
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
        "errors": sum(d["errors"] for d in done),
        "lost": sent - found,
        "wall_s": wall,
        "first_error": next((d["first_error"] for d in done if d["first_error"]), ""),
    }


def run_tracking_bench(
    writers: Sequence[int] = (1, 4, 8),
    steps: int = 100,
    keys: int = 10,
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
                MlflowServer(f"sqlite:///{tmp}/sqlite/mlruns.db", Path(tmp, "sqlite"), server_workers)
            ),
            # the password reaches the server as PGPASSWORD, never on its command line
            "postgresql": stack.enter_context(
                MlflowServer(
                    pg.uri().replace(f":{pg.password}@", "@"),
                    Path(tmp, "postgresql"),
                    server_workers,
                    env={"PGPASSWORD": pg.password},
                )
            ),
        }
        for backend in BACKENDS:  # every server worker opens its store on its first requests: not timed
            measure(servers[backend].url, 2 * server_workers, 5, keys, f"warm-up-{backend}")
        for n in writers:
            for backend in BACKENDS:
                row = {"backend": backend, **measure(servers[backend].url, n, steps, keys, f"bench-{backend}-{n}")}
                print(
                    f"[raydrat] {backend}: {n} writer(s): {row['metrics_per_s']:,.0f} metrics/s, "
                    f"{row['errors']} errors, {row['lost']} lost ({load_average()})",
                    flush=True,
                )
                rows.append(row)
    load_end = load_average()
    print_table(
        f"mlflow server ({server_workers} workers) on SQLite vs PostgreSQL: {steps} log_batch calls of {keys} "
        f"metrics per writer, MLflow's client with {RETRIES} retries",
        ["backend", "writers", "metrics/s", "errors", "lost", "wall s", "first error"],
        [
            [
                r["backend"],
                r["writers"],
                f"{r['metrics_per_s']:,.0f}",
                r["errors"],
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
                "server_workers": server_workers,
                "retries": RETRIES,
                "load_average_start": load_start,
                "load_average_end": load_end,
            },  # fmt: skip
        )
    return rows
