"""``raydrat bench sync``: DDP against local-update sync at the same token budget.

Two Ray Train workers on CPU (gloo) run, one after another inside one worker group (one
start-up for the whole table), every variant: ``ddp``, and for each ``H`` of
``--sync-steps`` (default 4,16): ``local/H`` (parameter averaging every H steps),
``diloco/H`` (the Nesterov outer optimizer at its defaults) and ``stream-int8/H``
(Streaming DiLoCo: fragments synced at staggered steps, the exchange overlapped with the
next steps and sent in int8 with per-block scales; see :func:`streaming_variant`). Each
variant starts from the same initial weights and sees the same batches in the same order
(rank ``r`` takes every ``W``-th batch from ``r``; blocks tokenized beforehand, so data
loading is not timed), for the same number of optimizer steps, through the same ``fit``
loop (techniques, sync strategy, evaluation) as ``raydrat train``.

Per variant: bytes this worker sent per optimizer step (all of them, and only the
scheduled syncs, without the flush before the final evaluation; see
``raydrat.core.techniques.sync.comm``), the most bytes launched in one step, communication
share of step time, tokens/s over both workers (steady state: the first step is
excluded; the slower worker sets the pace), and the validation loss at the end.
``--latency-ms 0,20`` repeats the table with each collective delayed by that latency (a
simulated slow link: the strategy's ``comm.latency_s``, a benchmark setting, not a run's).
``--link 1000,100,20`` runs the table on two Ray nodes joined by a real link limited to
each rate in Mbit/s (``raydrat.bench.link``; rows gain
``link_mbit``, and the bytes each node's end of the link really transmitted,
``wire_bytes_per_step``, read from the kernel's interface counters) and reports where each
variant overtakes DDP.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray.train
import ray.util
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from raydrat.bench import link
from raydrat.bench.local import LocalData, LocalRun
from raydrat.bench.report import print_table
from raydrat.config import ConfigError, RaydratConfig
from raydrat.core import metrics as M
from raydrat.core.data.demo import CORPUS_DIR, build_demo_corpus, tokenizer_file
from raydrat.core.data.plan import DEMO_SOURCE
from raydrat.core.fit import Callback, FitState
from raydrat.core.techniques.base import unwrap
from raydrat.core.techniques.sync.strategy import model_checksum
from raydrat.core.techniques.sync.torchft_local import (
    TORCHFT_MISSING,
    TorchftStrategy,
    start_lighthouse,
    torchft_available,
)
from raydrat.ray_session import ensure_ray
from raydrat.ray_train.lighthouse import by_ip
from raydrat.tables import write_json

ROWS_FILE = "rows.json"
DEFAULT_SYNC_STEPS = (4, 16)


def streaming_variant(sync_steps: int, n_layer: int, quantization: str = "int8") -> dict:
    """Streaming DiLoCo at ``H = sync_steps``: the most fragments (4, 2 or 1) that divide H
    and the model's blocks and leave at least 2 steps between two fragments' syncs, and a
    delay of half those steps (H=4: 2 fragments, delay 1; H=16: 4 fragments, delay 2)."""
    fragments = next(f for f in (4, 2, 1) if f <= n_layer and sync_steps % f == 0 and (sync_steps // f >= 2 or f == 1))
    period = sync_steps // fragments
    return {
        "mode": "local",
        "sync_steps": sync_steps,
        "outer_optimizer": "nesterov",
        "fragments": fragments,
        "delay": period // 2,
        "quantization": quantization,
    }


def torchft_variants(sync_steps: int, n_layer: int) -> list[dict]:
    """The rows that compare torchft's LocalSGD / DiLoCo with raydrat's own at ``H``: both
    engines for local/H, diloco/H and fp32 Streaming DiLoCo (the fragments and delay of
    :func:`streaming_variant`, ``overlap_keep: 0``, which is what torchft's delayed exchange
    does)."""
    stream = {**streaming_variant(sync_steps, n_layer, "none"), "overlap_keep": 0.0}
    out = []
    for base in (
        {"mode": "local", "sync_steps": sync_steps},
        {"mode": "local", "sync_steps": sync_steps, "outer_optimizer": "nesterov"},
        stream,
    ):
        out += [{**base, "engine": "raydrat"}, {**base, "engine": "torchft"}]
    return out


def default_variants(
    n_layer: int, sync_steps: tuple[int, ...] = DEFAULT_SYNC_STEPS, torchft: bool = False
) -> list[dict]:
    """ddp, then per ``H``: local/H, diloco/H and stream-int8/H; with ``torchft``, instead the
    rows of :func:`torchft_variants` (each of raydrat's beside torchft's)."""
    out = [{"mode": "ddp", "sync_steps": 1}]
    for h in sync_steps:
        if torchft:
            out += torchft_variants(h, n_layer)
            continue
        out += [
            {"mode": "local", "sync_steps": h},
            {"mode": "local", "sync_steps": h, "outer_optimizer": "nesterov"},
            streaming_variant(h, n_layer),
        ]
    return out


def variant_label(v: dict) -> str:
    if v["mode"] == "ddp":
        return "ddp"
    h, quant = v["sync_steps"], v.get("quantization", "none")
    ft = "torchft " if v.get("engine") == "torchft" else ""
    if v.get("fragments", 1) > 1 or v.get("delay", 0) or quant != "none":
        name = "stream" if v.get("outer_optimizer", "none") != "none" else "stream-avg"
        return f"{ft}{name}{'-' + quant if quant != 'none' else ''}/{h}"
    return f"{ft}{'diloco' if v.get('outer_optimizer', 'none') != 'none' else 'local'}/{h}"


def wire_tx_bytes() -> int | None:
    """Bytes the link interface of this worker's node has transmitted (the kernel's counter
    in ``/proc/net/dev`` of this network namespace), when gloo is bound to one
    (``GLOO_SOCKET_IFNAME``); else ``None``."""
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if not ifname:
        return None
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == ifname:
            return int(fields.split()[8])  # receive: 8 fields, then transmit bytes
    return None


class SteadyComm(Callback):
    """Drops the first step's communication from the window (warm-up) and keeps the last
    logged window (the whole run after the first step: ``log_every = steps``)."""

    def __init__(self):
        self.window: dict[str, float] = {}

    def on_step_end(self, state: FitState) -> None:
        if state.step == 1:
            state.techniques.sync.meter.window()

    def on_log(self, state: FitState, values: dict[str, float]) -> None:
        self.window = values


def run_variant(
    cfg: RaydratConfig, variant: dict, data: LocalData, rank: int, world: int, lighthouse: str | None = None
) -> dict:
    """Train one variant through ``fit`` in this worker (inside a Ray Train worker group) and
    return its figures, identical on every rank (reduced across workers). A torchft variant's
    replicas meet at the Lighthouse ``lighthouse``, each with a TCP store of its own."""
    sync = cfg.sync.model_validate({**cfg.sync.model_dump(), **{k: v for k, v in variant.items() if k != "latency_ms"}})
    tc = cfg.train.model_copy(update={"log_every": cfg.train.steps, "eval_every": cfg.train.steps})
    c = cfg.model_copy(update={"sync": sync, "train": tc})
    comm = SteadyComm()
    run = LocalRun.start(c, data.shard(rank, world), [comm], rank=rank, world_size=world)
    run.techniques.sync.comm.latency_s = variant.get("latency_ms", 0) / 1000.0  # the simulated slow link
    param_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
    strategy = run.techniques.sync
    store = None
    if isinstance(strategy, TorchftStrategy):
        here = ray.util.get_node_ip_address()
        store = dist.TCPStore(here, 0, is_master=True, wait_for_workers=False)
        strategy.connect(rank, lighthouse, store=(here, store.port), host=here)
        strategy.join()
    dist.barrier()
    wire_start = wire_tx_bytes()
    run.run()
    if isinstance(strategy, TorchftStrategy):
        strategy.close()
    wire = None if wire_start is None else wire_tx_bytes() - wire_start
    steady_s = torch.tensor([run.steady_s()], dtype=torch.float64)
    dist.all_reduce(steady_s, op=dist.ReduceOp.MAX)  # the slower worker sets the pace
    checksums, wires = [None] * world, [None] * world
    dist.all_gather_object(checksums, model_checksum(unwrap(run.model)))
    dist.all_gather_object(wires, wire)
    stats = strategy.comm
    tokens = len(run.timed_steps()) * run.state.tokens_per_step  # the steps steady_s times
    bytes_per_step = stats.total_bytes / tc.steps  # every step, the first too
    return {
        "mode": variant["mode"],
        "sync_steps": variant["sync_steps"],
        "outer_optimizer": sync.outer_optimizer,
        "outer_lr": sync.outer_lr if sync.outer_optimizer != "none" else None,
        "outer_momentum": sync.outer_momentum if sync.outer_optimizer != "none" else None,
        "quantization": sync.quantization,
        "engine": sync.engine,
        "fragments": sync.fragments,
        "delay": sync.delay,
        "latency_ms": variant.get("latency_ms", 0),
        "label": variant_label(variant),
        "bytes_per_step": bytes_per_step,
        "sched_bytes_per_step": (stats.total_bytes - stats.flush_bytes) / tc.steps,
        "peak_step_bytes": max(stats.launch_bytes.values(), default=0) if sync.mode == "local" else bytes_per_step,
        "wire_bytes_per_step": None if wire is None else [w / tc.steps for w in wires],
        "comm_s_per_step": comm.window[M.COMM_S_PER_STEP],
        "comm_fraction": comm.window[M.COMM_FRACTION],
        "tokens_per_s": tokens / float(steady_s),
        "val_loss": run.state.last_report[M.VAL_LOSS],
        "param_bytes": param_bytes,
        "checksums": checksums,
        "steps": tc.steps,
        "workers": world,
    }


def _bench_worker(loop_config: dict) -> None:
    cfg = RaydratConfig.model_validate(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    data: LocalData = loop_config["data"]
    lighthouse = loop_config.get("lighthouse")
    rows = [run_variant(cfg, v, data, rank, world, lighthouse) for v in loop_config["variants"]]
    # Train V2 returns the metrics of the latest checkpoint only: the rows travel in one.
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            Path(d, ROWS_FILE).write_text(json.dumps(rows))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"variants": len(rows)}, checkpoint=checkpoint)


def run_sync_workers(cfg: RaydratConfig, variants: list[dict], workers: int = 2) -> list[dict]:
    """Run ``variants`` in one worker group of ``workers`` Ray Train CPU workers."""
    ensure_ray()
    tc = cfg.train
    data = LocalData.load(cfg, workers=workers)
    if len(data.train) < workers:
        raise RuntimeError("corpus too small for the sync benchmark: lower train.batch_size")
    lighthouse = None
    if any(v.get("engine") == "torchft" for v in variants):
        if not torchft_available():
            raise ConfigError(TORCHFT_MISSING)
        # every replica is in every quorum: a variant's replicas start together
        lighthouse = start_lighthouse(min_replicas=workers, join_timeout_ms=1000)
    trainer = TorchTrainer(
        _bench_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "variants": variants,
            "data": data,
            # by this node's Ray IP: a worker on another node may not resolve this host's name
            "lighthouse": by_ip(lighthouse.address(), ray.util.get_node_ip_address()) if lighthouse else None,
        },
        torch_config=ray.train.torch.TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=False,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.worker_resources},
        ),
        run_config=ray.train.RunConfig(
            name=f"bench-sync-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(tc.storage_path).resolve()),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if lighthouse is not None:
            lighthouse.shutdown()
    with result.checkpoint.as_directory() as d:
        return json.loads(Path(d, ROWS_FILE).read_text())


def run_sync_bench(
    cfg: RaydratConfig,
    latencies_ms: list[float] | None = None,
    json_path: str | None = None,
    workers: int = 2,
    sync_steps: tuple[int, ...] = DEFAULT_SYNC_STEPS,
    torchft: bool = False,
) -> list[dict]:
    latencies_ms = latencies_ms or [0]
    variants = [
        {**v, "latency_ms": lat}
        for lat in latencies_ms
        for v in default_variants(cfg.model.n_layer, sync_steps, torchft)
    ]
    rows = [{**r, "link_mbit": None} for r in run_sync_workers(cfg, variants, workers)]
    print_sync_tables(cfg, rows, workers)
    if json_path:
        write_json(json_path, [{k: v for k, v in r.items() if k != "checksums"} for r in rows])
    return rows


def print_sync_tables(cfg: RaydratConfig, rows: list[dict], workers: int) -> None:
    """One table per (link rate, latency), each variant against that table's DDP row
    (the ``*_vs_ddp`` fields are added to the rows)."""
    tc = cfg.train
    for mbit, lat in dict.fromkeys((r["link_mbit"], r["latency_ms"]) for r in rows):
        sub = [r for r in rows if r["latency_ms"] == lat and r["link_mbit"] == mbit]
        ddp = next(r for r in sub if r["mode"] == "ddp")
        for r in sub:
            r["bytes_vs_ddp"] = r["bytes_per_step"] / ddp["bytes_per_step"] if ddp["bytes_per_step"] else float("nan")
            r["tokens_per_s_vs_ddp"] = r["tokens_per_s"] / ddp["tokens_per_s"]
            r["val_loss_vs_ddp"] = r["val_loss"] / ddp["val_loss"] - 1.0
        faster = [r["label"] for r in sub if r["mode"] == "local" and r["tokens_per_s"] > ddp["tokens_per_s"]]
        where = f"latency {lat:g} ms per collective" + ("" if mbit is None else f", link {mbit:g} Mbit/s")
        wire = mbit is not None and all(r.get("wire_bytes_per_step") for r in sub)
        print_table(
            f"sync: {cfg.name}, {workers} CPU workers (gloo){' on two nodes' if mbit is not None else ''}, "
            f"{tc.steps} optimizer steps x {tc.batch_size * tc.grad_accum * cfg.model.seq_len * workers} tokens, {where}",
            [
                "variant",
                "bytes/step",
                "vs ddp",
                "sched/step",
                "peak step",
                *(["wire/step"] if wire else []),
                "comm share",
                "tokens/s",
                "vs ddp",
                "val loss",
                "vs ddp",
            ],
            [
                [
                    r["label"],
                    f"{r['bytes_per_step']:,.0f}",
                    f"{r['bytes_vs_ddp']:.4f}",
                    f"{r['sched_bytes_per_step']:,.0f}",
                    f"{r['peak_step_bytes']:,.0f}",
                    *([f"{sum(r['wire_bytes_per_step']) / len(r['wire_bytes_per_step']):,.0f}"] if wire else []),
                    f"{r['comm_fraction']:.1%}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['tokens_per_s_vs_ddp']:.2f}x",
                    f"{r['val_loss']:.4f}",
                    f"{r['val_loss_vs_ddp']:+.1%}",
                ]
                for r in sub
            ],
            footer=f"faster than ddp in tokens/s at {where}: {', '.join(faster) or 'none'}",
        )


# -- over a real link: two Ray nodes in network namespaces (raydrat.bench.link) --------


def run_sync_bench_over_link(
    cfg: RaydratConfig,
    config: str,
    overrides: list[str],
    rates_mbit: list[float],
    latencies_ms: list[float] | None = None,
    json_path: str | None = None,
    workers: int = 2,
    sync_steps: tuple[int, ...] = DEFAULT_SYNC_STEPS,
    torchft: bool = False,
) -> list[dict]:
    """``raydrat bench sync --link RATE[,RATE...]``: the same variants with one worker on
    each of two Ray nodes joined by a ``tc``-limited veth pair, once per rate (Mbit/s;
    rows gain ``link_mbit``). Per rate, this benchmark's own command runs as the driver
    inside the head node's namespace (where it can reach the head), with
    ``scaling.worker_resources`` placing one worker per node. Without root or network
    namespaces it says so in one line and runs the one-node benchmark."""
    reason = link.unavailable_reason()
    if reason:
        print(f"raydrat: {reason}: running the one-node benchmark instead", file=sys.stderr)
        return run_sync_bench(cfg, latencies_ms, json_path, workers, sync_steps, torchft)
    if workers != 2:
        raise ConfigError(
            f"--link with --workers {workers}: the link joins two nodes, one worker each: use --workers 2"
        )
    lat = ",".join(f"{x:g}" for x in (latencies_ms or [0]))
    args = ["--latency-ms", lat, "--workers", "2", "--sync-steps", ",".join(map(str, sync_steps))]
    rows = run_over_link(cfg, config, overrides, rates_mbit, args + (["--torchft"] if torchft else []), quiet=True)
    print_sync_tables(cfg, rows, workers)
    for label in dict.fromkeys(r["label"] for r in rows if r["mode"] != "ddp"):
        won = [f"{r['link_mbit']:g}" for r in rows if r["label"] == label and r["tokens_per_s_vs_ddp"] > 1]
        print(f"{label}: faster than ddp at {', '.join(won) + ' Mbit/s' if won else 'no link rate tried'}")
    if json_path:
        write_json(json_path, rows)
    return rows


def link_overrides(cfg: RaydratConfig, overrides: list[str]) -> list[str]:
    """``overrides`` for a run on the two-node link: one worker per node
    (``scaling.worker_resources``), and the demo corpus by its path on this machine's disk,
    which both nodes share (a run refuses the corpus by name on two nodes)."""
    sets = [*overrides, f"scaling.worker_resources={{{link.NODE_RESOURCE}: 1}}"]
    if any(src.path == DEMO_SOURCE for src in cfg.data.sources):
        demo = build_demo_corpus(cfg.data.demo_dir, cfg.model.vocab_size)
        sources = [
            {**src.model_dump(exclude_none=True), "path": str(demo / CORPUS_DIR)}
            if src.path == DEMO_SOURCE
            else src.model_dump(exclude_none=True)
            for src in cfg.data.sources
        ]
        sets.append(f"data.sources={json.dumps(sources)}")
        if not cfg.data.tokenizer_path:
            sets.append(f"data.tokenizer_path={demo / tokenizer_file(cfg.model.vocab_size)}")
    return sets


def run_over_link(
    cfg: RaydratConfig, config: str, overrides: list[str], rates_mbit: list[float], args: list[str], quiet: bool
) -> list[dict]:
    """``raydrat bench sync CONFIG ARGS --json F`` as the driver inside the head node's
    namespace of a :class:`~raydrat.bench.link.TwoNodeLink`, once per rate; its rows with
    ``link_mbit``. ``quiet``: keep the command's console unless it fails (else it streams)."""
    rates = [link.check_rate(r) for r in rates_mbit]
    sets = link_overrides(cfg, overrides)
    rows: list[dict] = []
    with (
        link.TwoNodeLink(rate_mbit=rates[0], cpus_per_node=max(2.0, cfg.scaling.cpus_per_worker)) as net,
        tempfile.TemporaryDirectory(prefix="raydrat-sync-link-") as tmp,
    ):
        for rate in rates:  # every rate tc refuses is refused now, not after the first runs
            net.set_rate(rate)
        for rate in rates:
            net.set_rate(rate)
            out = Path(tmp) / f"rows-{rate:g}.json"
            cmd = [sys.executable, "-m", "raydrat.cli", "bench", "sync", config]
            cmd += [*(a for o in sets for a in ("--set", o)), *args, "--json", str(out)]
            print(f"link {rate:g} Mbit/s: running the benchmark on two nodes ...", flush=True)
            r = net.run(cmd, capture_output=quiet, text=True, cwd=os.getcwd())
            if r.returncode != 0:
                said = (r.stderr or r.stdout)[-3000:] if quiet else "its console is above"
                raise RuntimeError(f"bench sync over the {rate:g} Mbit/s link failed (exit {r.returncode}):\n{said}")
            rows += [{**row, "link_mbit": rate} for row in json.loads(out.read_text())]
    return rows
