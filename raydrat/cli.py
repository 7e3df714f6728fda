"""``raydrat`` command line: the parsers, and each command delegating to a module.

    raydrat --version
    raydrat train CONFIG [--set section.key=value ...] [--resume [RUN]] [--print-config] [--dry-run] [--verbose]
    raydrat estimate CONFIG [--set section.key=value ...] [--measure]
    raydrat tune SPACE [--resume] [--json PATH] [--verbose] [--dry-run]
    raydrat data demo [CONFIG] [--force]
    raydrat data tokenizer CONFIG --out PATH
    raydrat data prepare CONFIG --out PATH [--endpoint-url URL] [--keep N]
    raydrat data gc OUT [--keep N] [--dry-run]
    raydrat generate | eval | export RUN|CHECKPOINT ...   (raydrat.model_commands)
    raydrat tracking sync RUN ... [--storage DIR] [--tracking-uri URI]
    raydrat bench resume [CONFIG] [--mb N] [--before DIR] [--json PATH]
    raydrat bench shuffle [CONFIG] [--json PATH]
    raydrat bench overhead [CONFIG] [--rounds N] [--steps N] [--from-step N] [--json PATH] [--verbose]
    raydrat bench ingest [CONFIG] [--mb N ...] [--huge-mb N ...] [--json PATH]
    raydrat bench sync [CONFIG] [--latency-ms MS,...] [--sync-steps H,...] [--link MBIT,...] [--json PATH]
    raydrat bench sync [CONFIG] --faults STEP [--kill process,node] [--link MBIT] [--json PATH] [--verbose]
    raydrat bench combos [CONFIG] [--json PATH] [--only NAME ...]
    raydrat bench memory [--json PATH] [--only NAME ...]
    raydrat bench recompute [--models NAME ...] [--fractions F ...] [--steps N] [--no-compile | --no-eager] [--json PATH]
    raydrat bench model [CONFIG] [--modes eager compiled] [--shapes NAME ...] [--rounds N] [--profile] [--ablate] [--learning] [--json PATH]
    raydrat bench gpu [--dry-run] [--quick] [--tiny] [--out DIR] [--json PATH]
    raydrat job submit [RAY JOB SUBMIT OPTIONS] -- ENTRYPOINT
    raydrat bench tracking [--writers N,...] [--steps N] [--keys N] [--step-ms MS] [--server-workers N] [--json PATH]

Known problems (bad config, bad data) end with one line naming the culprit and exit status 2.
A run that crashes while training (a full disk, a worker killed, a node lost) and Ray failing
to start end with one ``raydrat: error:`` line naming the cause and the place, and for a
run, its newest complete checkpoint and the command that resumes it (exit status 1).

Each command imports what it needs when it runs (so ``raydrat --help`` stays fast): those
are the only imports inside functions in raydrat. What ``raydrat --help`` prints is
:data:`DESCRIPTION` and :data:`EPILOG`, written for users.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence

import yaml

from raydrat import __version__
from raydrat.config import ConfigError, load_config
from raydrat.core.data.errors import DataError
from raydrat.core.exceptions import walk_exceptions
from raydrat.crash import RayStartError, RunCrashed
from raydrat.interrupt import Interrupted, as_interrupted

DESCRIPTION = """\
Train decoder-only transformers efficiently on limited hardware, and scale the same job to a
Ray cluster: Ray Data streams the data, Ray Train trains, Ray Tune sweeps, MLflow records
every run. Without a cluster everything runs on a local Ray instance."""
EPILOG = """\
CONFIG is a YAML file or a shipped recipe: debug, demo, gpt2-small.
Override any value with --set section.key=value; `raydrat COMMAND --help` lists a command's options.

first run:
  raydrat data demo          build the embedded demo corpus and its tokenizer
  raydrat train demo         train the demo recipe on a local Ray instance
  raydrat train demo --dry-run   validate, estimate memory and plan the data; train nothing
"""


class UserError(Exception):
    """An error whose message is the whole story (no traceback is shown)."""


KNOWN_ERRORS = (ConfigError, DataError, UserError)


def _root_cause(exc: BaseException) -> BaseException:
    """Ray wraps worker exceptions; find a known one in the chain (raydrat's own instance
    first: Ray's copy of it is of a class derived from both, whose text is a traceback)."""
    known = [e for e in walk_exceptions(exc) if isinstance(e, KNOWN_ERRORS)]
    return next((e for e in known if type(e).__module__.startswith("raydrat")), known[0] if known else exc)


def error_message(exc: BaseException) -> str:
    """What ``raydrat: error:`` says for a known error: its message (a DataError's first
    line: Ray may append its own text to an exception that crossed a task)."""
    root = _root_cause(exc)
    text = str(root)
    return text.strip().splitlines()[0] if isinstance(root, DataError) and text.strip() else text


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "config",
        nargs=None if required else "?",
        default=None if required else "demo",
        help="YAML recipe path or shipped recipe name (debug, demo, gpt2-small)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config or args.dry_run:
        from raydrat.redact import redact_obj

        if args.print_config:
            print(yaml.safe_dump(redact_obj(cfg.to_dict()), sort_keys=False), end="")
        if args.dry_run:
            from raydrat.dry_run import describe

            print("\n".join(describe(cfg)))
        return 0
    from raydrat.tracking_store import check_config

    check_config(cfg.tracking)  # a store that cannot be reached: refused before the heavy imports
    from raydrat.console import quiet_console
    from raydrat.ray_train.trainer import run_training

    with quiet_console(args.verbose):
        summary = run_training(cfg, resume_run=args.resume)
    for line in summary.lines():
        print(line)
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.core.data.demo import build_demo_corpus

    out = build_demo_corpus(cfg.data.demo_dir, cfg.model.vocab_size, force=args.force)
    print(f"demo corpus ready in {out}")
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.core.data.sample import train_tokenizer_on_sources

    info = train_tokenizer_on_sources(cfg.data, cfg.model.vocab_size, args.out)
    print(
        f"tokenizer {info['path']}: {info['vocab_size']} tokens trained on {info['docs']} "
        f"documents ({info['text_bytes'] / 1e6:.1f} MB) in {info['seconds']}s; "
        f"sha256 {info['sha256'][:16]}…"
    )
    print(f"use it with: --set data.tokenizer_path={info['path']}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.console import quiet_console
    from raydrat.core.data.sources import check_writable, fs_path, location_for
    from raydrat.ray_data.prepare import prepare
    from raydrat.ray_session import ensure_ray
    from raydrat.ray_train.preflight import check_sources

    check_writable(location_for(args.out, args.endpoint_url), fs_path(args.out), f"--out {args.out}")  # before Ray
    check_sources(cfg)
    with quiet_console(args.verbose):
        ensure_ray()
        m = prepare(cfg.data, cfg.model.seq_len, cfg.model.vocab_size, args.out, args.endpoint_url, keep=args.keep)
    c = m["counts"]
    print(
        f"prepared {args.out} in {m['seconds']}s: {c['docs']:,} documents "
        f"({c['empty_docs']:,} empty skipped, {c['invalid_utf8_docs']:,} with invalid UTF-8 "
        f"replaced, {c['skipped_files']} unreadable files skipped)"
    )
    print(
        f"  train: {c['train_blocks']:,} blocks, {c['train_tokens']:,} tokens; val: "
        f"{c['val_stored_blocks']:,} blocks stored ({c['val_split_docs']:,} documents held out)"
    )
    print(f"  train from it with: --set data.prepared={args.out}")
    return 0


def cmd_data_gc(args: argparse.Namespace) -> int:
    from raydrat.core.data.prepared import collect_garbage
    from raydrat.core.data.sources import fs_path, location_for

    done = collect_garbage(location_for(args.out, args.endpoint_url), fs_path(args.out), args.keep, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{args.out}: {verb} {len(done['removed'])} generation(s)"
        + (f": {', '.join(done['removed'])}" if done["removed"] else "")
    )
    for line in done["kept"]:
        print(f"  kept {line}")
    return 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.bench.ingest import run_ingest

    run_ingest(cfg, sizes_mb=args.mb, huge_mb=args.huge_mb, json_path=args.json, workdir=args.workdir)
    return 0


def cmd_bench_resume(args: argparse.Namespace) -> int:
    from raydrat.bench.resume import run_resume_bench

    if args.mb < 100:
        raise UserError(f"--mb {args.mb:g}: the resume benchmark needs a corpus of at least 100 MB of text")
    run_resume_bench(
        args.config,
        args.overrides,
        mb=args.mb,
        positions=tuple(args.positions),
        before=args.before,
        json_path=args.json,
        workdir=args.workdir,
    )
    return 0


def cmd_bench_shuffle(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.bench.shuffle import run_shuffle_bench

    run_shuffle_bench(cfg, json_path=args.json)
    return 0


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.bench.overhead import FROM_STEP, STEPS, check_window, run_overhead
    from raydrat.bench.rounds import check_rounds
    from raydrat.console import quiet_console

    steps = STEPS if args.steps is None else args.steps
    start = FROM_STEP if args.from_step is None else args.from_step
    try:  # before any run starts
        check_rounds(args.rounds)
        check_window(steps, start)
    except ValueError as e:
        raise ConfigError(f"bench overhead: {e}") from None
    with quiet_console(args.verbose):
        run_overhead(cfg, rounds=args.rounds, steps=steps, start=start, json_path=args.json)
    return 0


def cmd_bench_recompute(args: argparse.Namespace) -> int:
    from raydrat.bench.recompute import run_recompute

    run_recompute(
        models=args.models,
        fractions=args.fractions,
        steps=args.steps,
        compiled=not args.no_compile,
        json_path=args.json,
        eager=not args.no_eager,
    )
    return 0


def cmd_bench_combos(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.bench.combos import run_combos

    run_combos(cfg, json_path=args.json, only=args.only)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    if args.dry_run:
        from raydrat.dry_run import describe_sweep

        print("\n".join(describe_sweep(args.space)))
        return 0
    from raydrat import tracking
    from raydrat.console import quiet_console
    from raydrat.tune.sweep import run_sweep

    with quiet_console(args.verbose):
        summary = run_sweep(args.space, resume=args.resume, json_path=args.json, verbose=args.verbose)
    print(summary.report)
    if summary.tracking_uri and summary.parent_run_id:
        parent = tracking.Run.attach(summary.tracking_uri, summary.parent_run_id)
        print(f"MLflow parent run {summary.parent_run_id}; browse with:")
        print(f"  {tracking.ui_command(summary.tracking_uri)}")
        print(f"  then open {tracking.ui_url(summary.tracking_uri, parent.experiment_id(), summary.name)}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.core.runtime import resolve

    if args.measure:  # refuse before printing anything when this machine cannot run it
        from raydrat.bench.memory import measurable

        measurable(cfg, args.device)
    est = resolve(cfg, gpus={"cpu": 0, "cuda": 1}.get(args.device)).estimate
    d = est.detail
    print(
        f"estimated peak training memory per worker for {cfg.name}: {est.total_bytes / 2**20:.2f} MiB\n"
        f"(device {d['device']}, precision {d['precision']}, batch {cfg.train.batch_size} x {cfg.model.seq_len} tokens"
        f"{f' x {cfg.train.grad_accum} micro-batches' if cfg.train.grad_accum > 1 else ''}, "
        f"{d['active_layers']}/{cfg.model.n_layer} layers, {d['stored_branches']}/{d['branches']} branches stored, "
        f"recompute {cfg.recompute.mode}, optimizer {cfg.optim.name}, "
        f"attention {'stores the T x T matrix' if d['attention_matrix'] else 'O(T) memory'})\n"
        f"the peak is in the {d['peak_phase']}; what is alive there:\n"
    )
    print(est.table())
    transient = ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.2f} MiB" for k, v in d["transient"].items())
    print(f"\ntransient at the peak: {transient}")
    print(
        "peak of each phase (MiB): "
        + ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.2f}" for k, v in d["phases"].items())
    )
    if d.get("fsdp"):
        f, mib = d["fsdp"], 2**20
        print(
            f"sync.mode=fsdp over {f['workers']} workers: each holds 1/{f['workers']} of the parameters "
            f"({f['sharded']['params'] / mib:.2f} MiB with the replicated buffers), gradients "
            f"({f['sharded']['grads'] / mib:.2f}) and optimizer state ({f['sharded']['optimizer'] / mib:.2f}), plus "
            f"{f['gathered']['params'] / mib:.2f} MiB of gathered parameters (root group and two blocks) in forward "
            f"and backward and {f['gathered']['grads'] / mib:.2f} MiB of unsharded gradients in the layer backward"
            + (
                "; the micro-batches before the last accumulate whole, unsharded gradients"
                if d["grad_accumulation"]
                else ""
            )
        )
    if d.get("planning_peak_bytes"):
        print(
            f"outside the training step: the recompute planner measures its costs with a forward that stores "
            f"every branch (first step; gated: every recompute.gates.refresh_every steps): "
            f"{d['planning_peak_bytes'] / 2**20:.2f} MiB"
        )
    if args.measure:
        from raydrat.bench.memory import STEPS, measure, print_measurement

        print(
            f"\nmeasuring: training {STEPS} steps of {cfg.name} on this machine's {args.device or 'device'}, every "
            "step under the allocator's profiler (a minute or more on a CPU)...",
            flush=True,
        )
        print_measurement(measure(cfg, device=args.device))
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from raydrat.bench.memory import run_memory_bench

    run_memory_bench(json_path=args.json, overrides=args.overrides, only=args.only)
    return 0


def cmd_bench_sync(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.console import quiet_console

    try:
        latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--latency-ms {args.latency_ms!r}: give milliseconds like 0,20,50") from None
    try:
        sync_steps = tuple(int(x) for x in args.sync_steps.split(",") if x.strip())
    except ValueError:
        sync_steps = ()
    if not sync_steps or min(sync_steps) < 1:
        raise UserError(f"--sync-steps {args.sync_steps!r}: give positive step counts like 4,16")
    with quiet_console(args.verbose):
        _run_bench_sync(args, cfg, latencies, sync_steps)
    return 0


def _run_bench_sync(args: argparse.Namespace, cfg, latencies: list[float], sync_steps: tuple[int, ...]) -> None:
    from raydrat.bench.link import parse_rates
    from raydrat.bench.sync import run_sync_bench, run_sync_bench_over_link

    if args.faults is not None:
        from raydrat.bench.sync_faults import run_fault_bench, run_fault_bench_over_link

        kills = tuple(k.strip() for k in (args.kill or ("process,node" if args.link else "process")).split(","))
        if args.link:
            run_fault_bench_over_link(
                cfg, args.config, args.overrides, parse_rates(args.link), args.faults, sync_steps, kills, args.json
            )
        else:
            run_fault_bench(cfg, args.faults, sync_steps, json_path=args.json, kills=kills)
        return
    if args.link:
        run_sync_bench_over_link(
            cfg,
            args.config,
            args.overrides,
            parse_rates(args.link),
            latencies,
            json_path=args.json,
            workers=args.workers,
            sync_steps=sync_steps,
            torchft=args.torchft,
        )
        return
    run_sync_bench(
        cfg, latencies, json_path=args.json, workers=args.workers, sync_steps=sync_steps, torchft=args.torchft
    )


def _counts(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text!r}: give positive counts like 1,4,8")
    return values


def cmd_bench_tracking(args: argparse.Namespace) -> int:
    from raydrat.bench.pgserver import PostgresUnavailable
    from raydrat.bench.tracking import run_tracking_bench

    writers = _counts(args.writers, "--writers")
    try:
        run_tracking_bench(
            writers, args.steps, args.keys, args.step_ms / 1000, args.server_workers, json_path=args.json
        )
    except PostgresUnavailable as exc:
        raise UserError(f"bench tracking needs a PostgreSQL server: {exc}") from None
    return 0


def cmd_job_submit(args: argparse.Namespace) -> int:
    from raydrat.job_submit import main as submit

    return submit(args.ray_args)


def cmd_generate(args: argparse.Namespace) -> int:
    from raydrat.model_commands import cmd_generate as run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from raydrat.model_commands import cmd_eval as run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from raydrat.model_commands import cmd_export as run

    return run(args)


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    from raydrat.tracking.sync import sync

    for run in args.runs:
        for line in sync(run, args.storage, args.tracking_uri):
            print(line)
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.bench.learning import run_learning
    from raydrat.bench.model import run_ablation, run_model_bench

    try:
        if args.learning:
            run_learning(cfg, json_path=args.json)
        elif args.ablate:
            run_ablation(cfg, rounds=args.rounds, round_s=args.round_s, shape_names=args.shapes, json_path=args.json)
        else:
            run_model_bench(
                cfg,
                json_path=args.json,
                rounds=args.rounds,
                round_s=args.round_s,
                shape_names=args.shapes,
                modes=tuple(args.modes),
                peer_names=args.peers,
                profile=args.profile,
            )
    except ValueError as e:
        raise ConfigError(f"bench model: {e}") from None
    return 0


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="RUN|CHECKPOINT",
        help="checkpoint directory, run directory, run name under --storage, or an export directory",
    )
    p.add_argument("--storage", default="ray_results", help="where run names are looked up (train.storage_path)")
    p.add_argument("--device", default="cpu", help="torch device to run the model on (default cpu)")


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """generate, eval and export: the commands of raydrat.model_commands."""
    p = sub.add_parser("generate", help="sample text from a trained model (streams; seeded)")
    _add_source_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default 0)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained model")
    _add_source_args(p)
    p.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="a data.sources entry (its path) or any path; default: the run's validation split",
    )
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="at most this many batches (default: train.eval_batches on the validation split, all of --data)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="log into a new run (eval-RUN) in this MLflow store; default: the training run itself, "
        "or the current store when the run's own cannot be reached",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a trained model for transformers (hf) or as raydrat safetensors")
    _add_source_args(p)
    p.add_argument("--format", choices=["hf", "safetensors"], required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_export)


def _add_tracking_commands(sub: argparse._SubParsersAction) -> None:
    """tracking sync: raydrat.tracking.sync."""
    tracking = sub.add_parser("tracking", help="MLflow records kept while the store was unreachable").add_subparsers(
        dest="tracking_command", required=True
    )
    p = tracking.add_parser("sync", help="deliver what a run kept while its MLflow store was unreachable")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a backlog folder, a run directory, or a run name")
    p.add_argument("--storage", default="ray_results", help="where run names are looked up (train.storage_path)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="the store's URI with its password, when the backlog names it masked (default $MLFLOW_TRACKING_URI)",
    )
    p.set_defaults(func=cmd_tracking_sync)


def _add_bench_model(bench: argparse._SubParsersAction) -> None:
    """bench model: raydrat.bench.model."""
    p = bench.add_parser(
        "model", help="raydrat's model vs transformers, torchtitan, litgpt and nanoGPT, training steps"
    )
    _add_config_args(p, required=False)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds, at least 5 (default 5)")
    p.add_argument("--round-s", type=float, default=1.0, help="shortest round of each model, seconds (default 1)")
    p.add_argument("--shapes", nargs="+", metavar="NAME", help="recipe, 6l, 12l (default: all three)")
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"], help="default: eager")
    p.add_argument("--peers", nargs="+", metavar="NAME", help="transformers torchtitan litgpt nanogpt (default: all)")
    p.add_argument("--profile", action="store_true", help="also the profiler's top ops vs the fastest peer")
    p.add_argument("--json", help="write one record per shape, mode and peer to this JSON file")
    p.add_argument(
        "--ablate",
        action="store_true",
        help="instead: the model with each of its speed changes reverted alone, interleaved",
    )
    p.add_argument(
        "--learning",
        action="store_true",
        help="instead: val loss per token against the nanoGPT reference over the recipe's train.steps",
    )
    p.set_defaults(func=cmd_bench_model)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``train``."""
    p = sub.add_parser("train", help="train a config through Ray Train")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue the newest interrupted run of this config (or the named run) "
        "from its latest checkpoint, in the same MLflow run",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML (credentials redacted) and exit"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, resolve the runtime, estimate memory, plan the data, print it; train nothing",
    )
    _add_verbose(p)
    p.set_defaults(func=cmd_train)


def _add_data(sub: argparse._SubParsersAction) -> None:
    """``data demo | tokenizer | prepare | gc``."""
    data = sub.add_parser("data", help="the demo corpus, a tokenizer, packed shards").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("demo", help="build the embedded demo corpus and its tokenizer")
    _add_config_args(p, required=False)
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=cmd_data_demo)

    p = data.add_parser("tokenizer", help="train a BPE tokenizer on a sample of data.sources")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    p.set_defaults(func=cmd_data_tokenizer)
    p = data.add_parser("prepare", help="tokenize and pack data.sources into parquet shards + manifest")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// --out")
    p.add_argument(
        "--keep",
        type=int,
        default=2,
        metavar="N",
        help="published generations to keep (default 2); older ones go once no running reader holds them",
    )
    _add_verbose(p)
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("gc", help="remove prepared generations no reader can be using, and crashed prepares' shards")
    p.add_argument("out", help="a `data prepare` output directory or s3://bucket/prefix")
    p.add_argument("--keep", type=int, default=2, metavar="N", help="published generations to keep (default 2)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// OUT")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.set_defaults(func=cmd_data_gc)


def _add_tune_and_estimate(sub: argparse._SubParsersAction) -> None:
    """``tune`` and ``estimate``."""
    p = sub.add_parser("tune", help="run a Ray Tune sweep from a tune_spaces/*.yaml file")
    p.add_argument("space", help="space YAML path or shipped space name (smoke, lambda_sweep, ...)")
    p.add_argument("--resume", action="store_true", help="continue the latest unfinished sweep of this space")
    p.add_argument("--json", help="write one record per trial to this JSON file")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray Tune's status tables and the workers' output (default: one line per trial event)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="load the space, draw the trials and screen them against the memory budget; run nothing",
    )
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("estimate", help="predict peak training memory per worker, by component")
    _add_config_args(p)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="device the estimate is for (default: from the config, else this machine)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="also train a few steps on this machine's device and print measured against predicted",
    )
    p.set_defaults(func=cmd_estimate)


def _add_job(sub: argparse._SubParsersAction) -> None:
    """``job submit`` (its options are ``ray job submit``'s: :func:`main` passes them on)."""
    job = sub.add_parser("job", help="Ray Jobs").add_subparsers(dest="job_command", required=True)
    p = job.add_parser(
        "submit",
        help="ray job submit with jobs/runtime_env.yaml, its wheel checked and pinned (run from a checkout's root)",
        description="raydrat job submit [RAY JOB SUBMIT OPTIONS] -- ENTRYPOINT: `ray job submit` with "
        "jobs/runtime_env.yaml; the wheel it installs must exist and hold the checkout's code, and is pinned by "
        "its sha256. Every other option goes to `ray job submit` unchanged.",
    )
    p.set_defaults(func=cmd_job_submit, ray_args=[])


def _add_bench_data(bench: argparse._SubParsersAction) -> None:
    """The data benchmarks: ``bench overhead | ingest | resume | shuffle``."""
    p = bench.add_parser("overhead", help="Ray Train loop vs a bare PyTorch loop, in interleaved rounds")
    _add_config_args(p, required=False)
    p.add_argument("--rounds", type=int, default=5, help="rounds, each a Ray Train run and a bare run (at least 5)")
    p.add_argument("--steps", type=int, help="steps of each run, replacing train.steps (default 100)")
    p.add_argument(
        "--from-step", type=int, help="the step whose end starts the measuring window, past data start-up (default 10)"
    )
    p.add_argument("--json", help="write the figures to this JSON file")
    _add_verbose(p)
    p.set_defaults(func=cmd_bench_overhead)
    p = bench.add_parser("ingest", help="Ray Data ingest vs a single-process tokenizer baseline")
    _add_config_args(p, required=False)
    p.add_argument(
        "--mb",
        type=float,
        nargs="+",
        default=[50.0, 100.0],
        help="generated corpus sizes in MB of text (default: 50 100)",
    )
    p.add_argument("--workdir", default=None, help="where to generate the corpora (default: a temp dir)")
    p.add_argument(
        "--huge-mb",
        type=float,
        nargs="*",
        default=[70.0],
        help="also a corpus of one one-line document of each size in MB (default: 70; none: leave it out)",
    )
    p.add_argument("--json", help="write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_ingest)

    p = bench.add_parser("resume", help="time from --resume to the first resumed step, by data position")
    p.add_argument("config", nargs="?", default="debug", help="recipe name or YAML path (default: debug)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--mb", type=float, default=100.0, help="generated corpus size in MB of text (at least 100)")
    p.add_argument(
        "--positions",
        type=float,
        nargs="+",
        default=[0.1, 0.5, 0.9],
        help="fractions of an epoch (default 0.1 0.5 0.9)",
    )
    p.add_argument("--before", default=None, metavar="DIR", help="a checkout of the earlier code to time beside it")
    p.add_argument("--workdir", default=None, help="where to generate the corpus (default: a temp dir)")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_resume)

    p = bench.add_parser("shuffle", help="how well the training order mixes the corpus, before and after")
    _add_config_args(p, required=False)
    p.add_argument("--json", help="write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_shuffle)


def _add_bench_techniques(bench: argparse._SubParsersAction) -> None:
    """The technique benchmarks: ``bench combos | recompute | memory``."""
    p = bench.add_parser("combos", help="efficiency techniques alone and combined, vs a baseline")
    _add_config_args(p, required=False)
    p.add_argument("--json", help="write one record per combination to this JSON file")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these combinations (plus the baseline)")
    p.set_defaults(func=cmd_bench_combos)

    p = bench.add_parser(
        "recompute", help="raydrat's recomputation plans vs torch checkpointing and torch.compile's budget"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["demo", "6l-d384"],
        help="recipe names / YAML paths, or 6l-d384 (default: demo 6l-d384)",
    )
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="activation budgets as fractions of the no-recompute saved bytes (default: 0.25 0.5 0.75)",
    )
    p.add_argument(
        "--steps", type=int, default=6, help="timed interleaved rounds after 2 untimed steps (at least 5; default 6)"
    )
    p.add_argument("--no-compile", action="store_true", help="eager rows only (compiling is slow on a small CPU)")
    p.add_argument(
        "--no-eager", action="store_true", help="compiled rows only (and eager none, the reference of the ratios)"
    )
    p.add_argument("--json", help="write one record per row to this JSON file")
    p.set_defaults(func=cmd_bench_recompute)

    p = bench.add_parser("memory", help="estimated vs allocator-measured peak memory on shipped configurations")
    p.add_argument("--json", help="write one record per configuration to this JSON file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in every configuration, e.g. --set train.device=cpu (repeatable)",
    )
    p.add_argument("--only", nargs="+", metavar="NAME", help="measure only these configurations")
    p.set_defaults(func=cmd_bench_memory)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose", action="store_true", help="show Ray's own console output (default: raydrat's lines only)"
    )


def _add_bench_sync_and_tracking(bench: argparse._SubParsersAction) -> None:
    """``bench sync`` and ``bench tracking``."""
    p = bench.add_parser("sync", help="ddp vs local-update sync on 2 CPU workers, same token budget")
    _add_config_args(p, required=False)
    p.add_argument(
        "--latency-ms", default="0", help="comma-separated delays added before each collective (a slow link), e.g. 0,50"
    )
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument(
        "--sync-steps",
        default="4,16",
        metavar="H[,H...]",
        help="local-update intervals to compare with ddp: local/H, diloco/H and stream-int8/H for each (default 4,16)",
    )
    p.add_argument(
        "--link",
        default=None,
        metavar="RATE[,RATE...]",
        help="run on two Ray nodes in network namespaces joined by a link limited to each rate "
        "(Mbit/s) in turn, e.g. 1000,100,20 (needs root; else the one-node benchmark)",
    )
    p.add_argument(
        "--faults",
        type=int,
        default=None,
        metavar="STEP",
        help="kill one replica's worker after STEP: ddp's whole-group restart against torchft local/H and "
        "diloco/H (steps lost, seconds until the replacement trains, tokens/s alone, val loss)",
    )
    p.add_argument(
        "--kill",
        default=None,
        metavar="process|node|process,node",
        help="with --faults: what dies, the remote worker's process, its whole node (raylet and workers; needs "
        "--link), or each in turn (default: process on one node, process,node with --link)",
    )
    p.add_argument(
        "--torchft",
        action="store_true",
        help="compare raydrat's own local/H, diloco/H and fp32 stream/H with torchft's (sync.engine=torchft), "
        "row beside row, instead of the default rows",
    )
    p.add_argument("--json", help="write one record per row to this JSON file")
    _add_verbose(p)
    p.set_defaults(func=cmd_bench_sync)

    p = bench.add_parser(
        "tracking",
        help="metrics/s, failed requests and lost metrics of concurrent writers (raydrat runs): mlflow server on "
        "SQLite vs PostgreSQL",
    )
    p.add_argument(
        "--writers", default="1,4,8", metavar="N[,N...]", help="concurrent writers, each a run (default 1,4,8)"
    )
    p.add_argument("--steps", type=int, default=100, help="training steps each writer logs (default 100)")
    p.add_argument("--keys", type=int, default=10, help="metrics logged per step (default 10)")
    p.add_argument("--step-ms", type=float, default=20.0, help="a step's time, in milliseconds (default 20)")
    p.add_argument("--server-workers", type=int, default=4, help="mlflow server --workers (default 4, its own default)")
    p.add_argument("--json", help="write one record per row to this JSON file")
    p.set_defaults(func=cmd_bench_tracking)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydrat", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"raydrat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_train(sub)
    _add_data(sub)
    _add_tune_and_estimate(sub)
    _add_job(sub)
    bench = sub.add_parser(
        "bench", help="benchmarks: overhead, ingest, sync, techniques, memory, model, GPU"
    ).add_subparsers(dest="bench_command", required=True)
    _add_bench_data(bench)
    _add_bench_techniques(bench)
    _add_bench_sync_and_tracking(bench)
    _add_bench_model(bench)
    # listed here; its arguments are raydrat.bench.gpu's own parser (main dispatches to it)
    bench.add_parser("gpu", help="the CUDA figures in one command (see `raydrat bench gpu --help`)")

    _add_model_commands(sub)
    _add_tracking_commands(sub)
    return parser


def _train_command(args: argparse.Namespace) -> str:
    """The ``raydrat train`` command the user ran, without ``--resume``."""
    return " ".join(
        ["raydrat", "train", shlex.quote(args.config), *(f"--set {shlex.quote(o)}" for o in args.overrides)]
    )


def _interrupted_message(args: argparse.Namespace, stopped: Interrupted) -> str:
    """What a stopped command says: for ``train``, how to resume the run (or that it
    stopped before its first complete checkpoint and has nothing to resume)."""
    if args.command != "train" or not stopped.run_name:
        return f"raydrat: interrupted by {stopped.signame}"
    again = _train_command(args)
    if not stopped.resumable:
        return (
            f"raydrat: interrupted by {stopped.signame} before run {stopped.run_name} saved a complete "
            f"checkpoint: nothing to resume; start it again with: {again}"
        )
    return (
        f"raydrat: interrupted by {stopped.signame}: run {stopped.run_name} stopped (MLflow run KILLED), "
        f"its complete checkpoints kept; resume it with:\n  {again} --resume {shlex.quote(stopped.run_name)}"
    )


def _crash_message(args: argparse.Namespace, crashed: RunCrashed) -> str:
    """What a run that crashed while training says: the cause in one ``raydrat: error:`` line,
    then the incomplete checkpoints removed, the newest complete one and how to resume."""
    lines = [f"raydrat: error: run {crashed.run_name}: {crashed.cause}"]
    if crashed.removed:
        lines.append(f"  removed the incomplete checkpoint(s) it left: {', '.join(crashed.removed)}")
    again = _train_command(args)
    if crashed.checkpoint:
        lines.append(f"  newest complete checkpoint: {crashed.checkpoint}; resume with:")
        lines.append(f"  {again} --resume {shlex.quote(crashed.run_name)}")
    else:
        lines.append(f"  no complete checkpoint: nothing to resume; start it again with: {again}")
    if crashed.details:
        lines.append(f"  the full traceback: {crashed.details}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "gpu"]:  # its own parser, in a module that runs without Ray (the GPU machine)
        from raydrat.bench.gpu import main as bench_gpu

        return bench_gpu(argv[2:], prog="raydrat bench gpu")
    if argv[:2] == ["job", "submit"] and not {"-h", "--help"} & set(argv[2:3]):  # the rest is ray's
        args = argparse.Namespace(command="job", func=cmd_job_submit, ray_args=argv[2:])
    else:
        args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during `raydrat train` (raydrat.interrupt)
        stopped = as_interrupted(exc)
        print(_interrupted_message(args, stopped), file=sys.stderr)
        return stopped.exit_code
    except RunCrashed as crashed:
        print(_crash_message(args, crashed), file=sys.stderr)
        return 1
    except RayStartError as failed:
        print(f"raydrat: error: {failed}", file=sys.stderr)
        return 1
    except Exception as exc:
        root = _root_cause(exc)
        if isinstance(root, KNOWN_ERRORS):
            print(f"raydrat: error: {error_message(exc)}", file=sys.stderr)
            return 2

        raise


if __name__ == "__main__":
    sys.exit(main())
