"""The commands that use a trained model, registered into ``raydrat``'s parser by
:func:`register` (kept apart from :mod:`raydrat.cli` so each grows on its own):

    raydrat generate RUN|CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S]
    raydrat eval RUN|CHECKPOINT [--data SOURCE] [--batches N]
    raydrat export RUN|CHECKPOINT --format hf|safetensors --out DIR
    raydrat bench model [CONFIG] [--json PATH] [--steps N]

RUN|CHECKPOINT is a checkpoint directory, a run directory or a run name under
``--storage`` (default ``ray_results``, as ``train.storage_path``), or for generate and eval
also a directory written by ``raydrat export``. As in :mod:`raydrat.cli`, each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN|CHECKPOINT",
                   help="checkpoint directory, run directory, run name under --storage, or an export directory")
    p.add_argument("--storage", default="ray_results", help="where run names are looked up (train.storage_path)")
    p.add_argument("--device", default="cpu", help="torch device to run the model on (default cpu)")


def _tokenizer(loaded):
    from raydrat.config import ConfigError
    from raydrat.core.data.tokenizer import load_tokenizer, tokenizer_special_ids

    if loaded.tokenizer_path is None:
        raise ConfigError(f"{loaded.source} carries no tokenizer: export it with `raydrat export --format hf`")
    eod = loaded.cfg.data.eod_token if loaded.cfg is not None else None
    tok = load_tokenizer(loaded.tokenizer_path, loaded.model_cfg.vocab_size, eod)
    return tok, tokenizer_special_ids(loaded.tokenizer_path, tok, eod)[0]


class _Streamer:
    """Prints the text of the tokens drawn so far as it grows (a token holding part of a
    UTF-8 character waits for the rest)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()
        return text


def cmd_generate(args: argparse.Namespace) -> int:
    from raydrat.config import ConfigError
    from raydrat.core.model.generate import generate
    from raydrat.core.model.load import load_model

    for name, value, ok in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0),
                            ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1),
                            ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1)):
        if not ok:
            raise ConfigError(f"{name} {value} is out of range: max-new-tokens >= 0, temperature >= 0 "
                              "(0: greedy), top-k >= 1, 0 < top-p <= 1")
    loaded = load_model(args.source, args.storage, args.device)
    tok, eod = _tokenizer(loaded)
    prompt = tok.encode(args.prompt).ids or [eod]
    sys.stdout.write(args.prompt)
    stream = _Streamer(tok)
    generate(loaded.model, prompt[-loaded.model_cfg.seq_len:], args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=None if args.no_stop else eod,
             on_token=stream)
    stream.finish()
    return 0


def _eval_batches(cfg, data: str | None, batch_size: int):
    """Batches of ``(B, seq_len + 1)`` blocks: the run's validation split, or every block of
    ``data`` (an entry of ``data.sources`` by path, or any path), in the training order."""
    import numpy as np
    import torch

    from raydrat.config.data import SourceConfig
    from raydrat.core.data.blocks import iter_blocks_local

    mc = cfg.model
    if data is None:
        blocks = iter_blocks_local(cfg.data, mc.seq_len, mc.vocab_size, "val")
    else:
        entry = next((s for s in cfg.data.sources if s.path == data), None) or SourceConfig(path=data)
        dcfg = cfg.data.model_copy(update={"sources": [entry]})
        blocks = itertools.chain(iter_blocks_local(dcfg, mc.seq_len, mc.vocab_size, "train"),
                                 iter_blocks_local(dcfg, mc.seq_len, mc.vocab_size, "val"))
    while True:
        chunk = list(itertools.islice(blocks, batch_size))
        if len(chunk) < batch_size:  # drop_last, as the training loop's batches
            return
        yield torch.from_numpy(np.stack(chunk)).long()


def _log_to_run(loaded, metrics: dict[str, float]) -> str | None:
    """Log ``metrics`` into the MLflow run that trained the checkpoint; its run id or None."""
    from pathlib import Path

    from raydrat import tracking
    from raydrat.ray_train import resume

    run_dir = Path(loaded.source).parent
    if loaded.cfg is None or not (run_dir / resume.RUN_FILE).is_file():
        return None
    record = resume.read_run_record(run_dir)
    if not record.get("mlflow_run_id"):
        return None
    uri = resume.tracking_uri_for(record, tracking.resolve_tracking_uri(loaded.cfg.tracking))
    run = tracking.Run.attach(uri, record["mlflow_run_id"])
    run.log_metrics(metrics, step=loaded.step or 0)
    return run.run_id


def cmd_eval(args: argparse.Namespace) -> int:
    from raydrat.config import ConfigError
    from raydrat.core.evaluate import evaluate_blocks, token_byte_lengths
    from raydrat.core.model.load import load_model

    loaded = load_model(args.source, args.storage, args.device)
    if loaded.cfg is None:
        raise ConfigError(f"{loaded.source} carries no run config (no data to evaluate on): give a checkpoint, "
                          "or a safetensors export of one")
    cfg = loaded.cfg
    tok, _ = _tokenizer(loaded)
    max_batches = args.batches or (cfg.train.eval_batches if args.data is None else None)
    total = f"/{max_batches}" if max_batches else ""
    tty = sys.stderr.isatty()

    def progress(i: int) -> None:
        if tty:
            sys.stderr.write(f"\reval: {i + 1}{total} batches")
            sys.stderr.flush()

    batches = (b.to(args.device) for b in _eval_batches(cfg, args.data, args.batch_size or cfg.train.batch_size))
    result = evaluate_blocks(loaded.model, batches, max_batches, token_byte_lengths(tok, cfg.model.vocab_size),
                             on_batch=progress)
    if tty:
        sys.stderr.write("\n")
    where = "validation split" if args.data is None else args.data
    print(f"{loaded.source} (step {loaded.step}) on the {where}:")
    for line in result.lines():
        print(f"  {line}")
    prefix = "eval/" if args.data is None else "eval/data/"
    run_id = _log_to_run(loaded, result.metrics(prefix))
    if run_id:
        print(f"  logged to MLflow run {run_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raydrat.core.data.tokenizer import resolve_tokenizer_file
    from raydrat.core.model.export import export_hf, export_safetensors
    from raydrat.core.model.load import load_model

    loaded = load_model(args.source, args.storage)
    state = loaded.model.state_dict()
    if args.format == "hf":
        eod = loaded.cfg.data.eod_token if loaded.cfg is not None else None
        out = export_hf(state, loaded.model_cfg, args.out, loaded.tokenizer_path, eod)
    else:
        out = export_safetensors(state, loaded.model_cfg, args.out,
                                 loaded.cfg.to_dict() if loaded.cfg is not None else None)
        if loaded.tokenizer_path is not None:  # the tokenizer travels with the weights
            shutil.copyfile(resolve_tokenizer_file(loaded.tokenizer_path), out / "tokenizer.json")
    print(f"exported {loaded.source} as {args.format} to {out}")
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from raydrat.bench.model import run_ablation, run_model_bench
    from raydrat.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.ablate:
        run_ablation(cfg, steps=args.steps, json_path=args.json)
    else:
        run_model_bench(cfg, json_path=args.json, steps=args.steps)
    return 0


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction, add_config_args) -> None:
    """Add generate, eval, export (to ``sub``) and bench model (to ``bench``)."""
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
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="a data.sources entry (its path) or any path; default: the run's validation split")
    p.add_argument("--batches", type=int, default=None,
                   help="at most this many batches (default: train.eval_batches on the validation split, "
                        "all of --data)")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a trained model for transformers (hf) or as raydrat safetensors")
    _add_source_args(p)
    p.add_argument("--format", choices=["hf", "safetensors"], required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_export)

    p = bench.add_parser("model", help="raydrat's model vs torchtitan's Llama and nanoGPT, eager training steps")
    add_config_args(p, required=False)
    p.add_argument("--steps", type=int, default=30, help="timed steps per model and shape (default 30)")
    p.add_argument("--json", help="write one record per shape and settings to this JSON file")
    p.add_argument("--ablate", action="store_true",
                   help="instead: the model with each of its speed changes reverted alone, interleaved")
    p.set_defaults(func=cmd_bench_model)
