"""``raydrat`` command line: thin, every command delegates to a module.

    raydrat train CONFIG [--set section.key=value ...]
    raydrat data demo [CONFIG] [--force]
    raydrat bench overhead [CONFIG] [--json PATH]
    raydrat tune SPACE [--resume] [--json PATH]
    raydrat estimate CONFIG [--set section.key=value ...]

CONFIG is a YAML path or a shipped recipe name (debug, demo, gpt2-small). Known problems
(bad config, bad data) end with one line naming the culprit and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from raydrat.config import ConfigError, load_config


class UserError(Exception):
    """An error whose message is the whole story (no traceback is shown)."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from raydrat.data.errors import DataError

    return (ConfigError, DataError, UserError)


def _root_cause(exc: BaseException) -> BaseException:
    """Ray wraps worker exceptions; find a known one in the chain."""
    seen = set()
    stack = [exc]
    known = _known_errors()
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, known):
            return e
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
        for attr in ("worker_failures", "errors"):
            errs = getattr(e, attr, None)
            if isinstance(errs, dict):
                stack.extend(errs.values())
            elif isinstance(errs, (list, tuple)):
                stack.extend(errs)
    return exc


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", default=None if required else "demo",
                   help="YAML recipe path or shipped recipe name (debug, demo, gpt2-small)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.train.trainer import run_training

    summary = run_training(cfg)
    for line in summary.lines():
        print(line)
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.data.demo import build_demo_corpus

    out = build_demo_corpus(cfg.data.demo_dir, cfg.model.vocab_size, force=args.force)
    print(f"demo corpus ready in {out}")
    return 0


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.bench.overhead import run_overhead

    run_overhead(cfg, json_path=args.json)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raydrat import tracking
    from raydrat.tune.sweep import run_sweep

    summary = run_sweep(args.space, resume=args.resume, json_path=args.json)
    print(summary.report)
    if summary.tracking_uri and summary.parent_run_id:
        print(f"MLflow parent run {summary.parent_run_id}; browse with:")
        print(f"  {tracking.ui_command(summary.tracking_uri)}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from raydrat.memory import estimate_memory

    est = estimate_memory(cfg, device=args.device)
    d = est.detail
    print(
        f"estimated peak training memory per worker for {cfg.name}: {est.total_bytes / 2**20:.2f} MiB\n"
        f"(device {d['device']}, precision {d['precision']}, batch {cfg.train.batch_size} x {cfg.model.seq_len} tokens, "
        f"{d['active_layers']}/{cfg.model.n_layer} layers, {d['stored_branches']}/{d['branches']} branches stored, "
        f"checkpointing {cfg.train.checkpointing}, optimizer {cfg.optim.name}, "
        f"attention {'stores the T x T matrix' if d['attention_matrix'] else 'O(T) memory'})\n"
    )
    print(est.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydrat", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config through Ray Train")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("demo", help="build the embedded demo corpus and its tokenizer")
    _add_config_args(p, required=False)
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=cmd_data_demo)

    p = sub.add_parser("tune", help="run a Ray Tune sweep from a tune_spaces/*.yaml file")
    p.add_argument("space", help="space YAML path or shipped space name (smoke, lambda_sweep, ...)")
    p.add_argument("--resume", action="store_true", help="continue the latest unfinished sweep of this space")
    p.add_argument("--json", help="write one record per trial to this JSON file")
    p.set_defaults(func=cmd_tune)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("overhead", help="Ray Train loop vs a bare PyTorch loop")
    _add_config_args(p, required=False)
    p.add_argument("--json", help="write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_overhead)

    p = sub.add_parser("estimate", help="predict peak training memory per worker, by component")
    _add_config_args(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device the estimate is for (default: from the config, else this machine)")
    p.set_defaults(func=cmd_estimate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("raydrat: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turn known errors into one line
        root = _root_cause(exc)
        if isinstance(root, _known_errors()):
            print(f"raydrat: error: {root}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
