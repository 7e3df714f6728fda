"""The commands that use a trained model: ``raydrat generate``, ``eval`` and ``export``
(their parsers are in :mod:`raydrat.cli`, which imports this module when one of them runs).

RUN|CHECKPOINT is a checkpoint directory, a run directory or a run name under
``--storage`` (default ``ray_results``, as ``train.storage_path``), or for generate and eval
also a directory written by ``raydrat export``.

Work that lasts more than a few seconds prints its progress on stderr
(:mod:`raydrat.progress`): eval's batches, and generate's tokens when its text goes to a file
or a pipe (on a terminal the streamed text is the progress). ``eval`` logs its figures into
the MLflow run that trained the checkpoint and says which run, in which store (the URI's
password masked), or that the checkpoint's run was not tracked. ``generate`` logs nothing.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from raydrat import tracking
from raydrat.config import ConfigError
from raydrat.config.data import SourceConfig
from raydrat.core.checkpoint.export import export_hf, export_safetensors
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.data.tokenizer import load_tokenizer, resolve_tokenizer_file, tokenizer_special_ids
from raydrat.core.evaluate import evaluate, token_byte_lengths
from raydrat.core.model.generate import generate
from raydrat.core.setup import load_model
from raydrat.progress import Progress
from raydrat.ray_train import resume
from raydrat.redact import redact_uri


def _tokenizer(loaded):
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
        self.out.write(text[self.shown :])
        self.out.flush()
        self.shown = len(text)

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        self.out.write(text[self.shown :] + "\n")
        self.out.flush()
        return text


def cmd_generate(args: argparse.Namespace) -> int:
    for name, value, ok in (
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0),
        ("--temperature", args.temperature, args.temperature >= 0),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1),
    ):
        if not ok:
            raise ConfigError(
                f"{name} {value} is out of range: max-new-tokens >= 0, temperature >= 0 "
                "(0: greedy), top-k >= 1, 0 < top-p <= 1"
            )
    loaded = load_model(args.source, args.storage, args.device)
    tok, eod = _tokenizer(loaded)
    prompt = tok.encode(args.prompt).ids or [eod]
    sys.stdout.write(args.prompt)
    stream = _Streamer(tok)
    # on a terminal the streamed text is the progress; into a file or a pipe, lines on stderr
    progress = None if sys.stdout.isatty() else Progress("generate", "tokens", args.max_new_tokens)

    def on_token(token: int) -> None:
        stream(token)
        if progress is not None:
            progress.update(len(stream.ids))

    generate(
        loaded.model,
        prompt[-loaded.model_cfg.seq_len :],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=None if args.no_stop else eod,
        on_token=on_token,
    )
    stream.finish()
    if progress is not None:
        progress.finish()
    return 0


def _eval_batches(cfg, data: str | None, batch_size: int):
    """Batches of ``(B, seq_len + 1)`` blocks: the run's validation split, or every block of
    ``data`` (an entry of ``data.sources`` by path, or any path), in the training order."""

    mc = cfg.model
    if data is None:
        blocks = iter_blocks_local(cfg.data, mc.seq_len, mc.vocab_size, "val")
    else:
        entry = next((s for s in cfg.data.sources if s.path == data), None) or SourceConfig(path=data)
        dcfg = cfg.data.model_copy(update={"sources": [entry]})
        blocks = itertools.chain(
            iter_blocks_local(dcfg, mc.seq_len, mc.vocab_size, "train"),
            iter_blocks_local(dcfg, mc.seq_len, mc.vocab_size, "val"),
        )
    while True:
        chunk = list(itertools.islice(blocks, batch_size))
        if len(chunk) < batch_size:  # drop_last, as the training loop's batches
            return
        yield torch.from_numpy(np.stack(chunk)).long()


def _tracked_run(loaded, store: str | None = None) -> tracking.Run:
    """Where ``eval`` logs: the MLflow run that trained the checkpoint (what it left
    undelivered is delivered first); a new run beside it in ``store`` (``--tracking-uri``),
    or in the current store (``tracking.tracking_uri`` / ``$MLFLOW_TRACKING_URI``) when the
    run's own store cannot be reached; ``Run.off()`` when no tracked run wrote it."""
    run_dir = Path(loaded.source).parent
    if loaded.cfg is None or not (run_dir / resume.RUN_FILE).is_file():
        return tracking.Run.off() if store is None else _eval_run(loaded, store, None)
    record = resume.read_run_record(run_dir)
    if store is not None:
        return _eval_run(loaded, store, record)
    if not record.get("mlflow_run_id"):
        return tracking.Run.off()
    current = tracking.resolve_tracking_uri(loaded.cfg.tracking)
    try:
        uri = resume.tracking_uri_for(record, current)
    except resume.ResumeError:  # its password is not recorded and the current store is another one
        print(
            f"raydrat: the run's store {record['tracking_uri']} needs its password, which is not recorded: "
            "logging to the current store instead",
            file=sys.stderr,
        )
        return _eval_run(loaded, current, record)
    run = tracking.Run.attach(uri, record["mlflow_run_id"], tracking.backlog_in(run_dir))
    try:
        run.settle()
        away = run.status() is None  # None: the store did not answer
    except tracking.TrackingUnavailable:
        away = True
    if away and current and redact_uri(current) != redact_uri(uri):  # the current store is another one
        print(
            f"raydrat: the run's store {redact_uri(uri)} is unreachable: logging to the current store instead",
            file=sys.stderr,
        )
        return _eval_run(loaded, current, record)
    return run


def _eval_run(loaded, store: str, record: dict | None) -> tracking.Run:
    """A run of its own for an evaluation in ``store``: ``eval-<the training run>``, tagged
    with the run it evaluates (its store's URI redacted) and the checkpoint."""
    name = (record or {}).get("run_name") or Path(loaded.source).name
    tags = {"raydrat.evaluates.checkpoint": str(loaded.source)}
    if record and record.get("mlflow_run_id"):
        tags["raydrat.evaluates.run"] = f"{redact_uri(record.get('tracking_uri') or '')} {record['mlflow_run_id']}"
    experiment = loaded.cfg.tracking.experiment if loaded.cfg is not None else "raydrat"
    try:
        return tracking.Run.start(store, experiment, f"eval-{name}", tags=tags)
    except tracking.TrackingUnavailable as exc:
        raise ConfigError(f"--tracking-uri {redact_uri(store)}: {exc}") from None


def _log_to_run(run: tracking.Run, metrics: dict[str, float], step: int) -> str:
    """Log ``metrics`` into ``run``; the line that says where they went."""
    if not run:
        return "not logged to MLflow: the checkpoint's run was not tracked"
    run.log_metrics(metrics, step=step)
    left = run.close()
    where = f"MLflow run {run.run_id} in {redact_uri(run.uri)}"
    if left:
        return f"kept for {where} in {run.backlog} (the store is unreachable; it is delivered later)"
    return f"logged to {where}"


def cmd_eval(args: argparse.Namespace) -> int:
    loaded = load_model(args.source, args.storage, args.device)
    if loaded.cfg is None:
        raise ConfigError(
            f"{loaded.source} carries no run config (no data to evaluate on): give a checkpoint, "
            "or a safetensors export of one"
        )
    cfg = loaded.cfg
    tok, _ = _tokenizer(loaded)
    run = _tracked_run(loaded, args.tracking_uri)  # before the work: a store it cannot name is refused now
    max_batches = args.batches or (cfg.train.eval_batches if args.data is None else None)
    batch_size = args.batch_size or cfg.train.batch_size
    progress = Progress("eval", "batches", max_batches, tokens_per_unit=batch_size * cfg.model.seq_len)
    batches = (b.to(args.device) for b in _eval_batches(cfg, args.data, batch_size))
    result = evaluate(
        loaded.model,
        batches,
        max_batches,
        token_byte_lengths(tok, cfg.model.vocab_size),
        on_batch=lambda i: progress.update(i + 1),
    )
    progress.finish()
    where = "validation split" if args.data is None else args.data
    print(f"{loaded.source} (step {loaded.step}) on the {where}:")
    for line in result.lines():
        print(f"  {line}")
    prefix = "eval/" if args.data is None else "eval/data/"
    print(f"  {_log_to_run(run, result.metrics(prefix), loaded.step or 0)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    loaded = load_model(args.source, args.storage)
    state = loaded.model.state_dict()
    if args.format == "hf":
        eod = loaded.cfg.data.eod_token if loaded.cfg is not None else None
        out = export_hf(state, loaded.model_cfg, args.out, loaded.tokenizer_path, eod)
    else:
        out = export_safetensors(
            state, loaded.model_cfg, args.out, loaded.cfg.to_dict() if loaded.cfg is not None else None
        )
        if loaded.tokenizer_path is not None:  # the tokenizer travels with the weights
            shutil.copyfile(resolve_tokenizer_file(loaded.tokenizer_path), out / "tokenizer.json")
    print(f"exported {loaded.source} as {args.format} to {out}")
    return 0
