"""``raydrat train CONFIG --dry-run``: everything a run decides before it trains, printed,
nothing trained (``raydrat tune SPACE --dry-run``: the sweep's trials and what admission
decides for each). The config is validated (by loading it), the runtime resolved (device,
precision, attention kernel: the same :func:`raydrat.core.runtime.resolve` the run calls),
the memory estimated, and the data planned from metadata alone (listings, parquet footers,
a prepared manifest), so a bad source fails here with the error the run would give.

It writes nothing: no Ray instance is started (with ``RAY_ADDRESS`` set the cluster is
asked for its GPUs), no MLflow run is created, no tokenizer is trained, and the demo corpus is
read through its manifest when it is there; when it is not, the dry run says what the run
would build (the standard library's documents, counted in memory) and plans the other
sources."""

from __future__ import annotations

from pathlib import Path

from raydrat import tracking_store
from raydrat.config import RaydratConfig
from raydrat.core.data.demo import read_manifest, stdlib_documents
from raydrat.core.data.order import stream_count
from raydrat.core.data.plan import DEMO_SOURCE, plan_corpus
from raydrat.core.data.prepared import read_manifest_at
from raydrat.core.data.sources import fs_path, location_for
from raydrat.core.data.spec import check_tokenizer, tokenizer_location
from raydrat.core.runtime import resolve
from raydrat.ray_session import expected_gpus
from raydrat.redact import redact_uri
from raydrat.tune import admission as A
from raydrat.tune import report as R
from raydrat.tune.space import expand, load_space


def describe(cfg: RaydratConfig) -> list[str]:
    """The dry run's lines: runtime, memory, data, tokenizer, tracking."""
    runtime = resolve(cfg, gpus=expected_gpus())
    est = runtime.estimate
    sc, tr = cfg.scaling, cfg.train
    workers = f"{sc.min_workers}-{sc.max_workers} (elastic)" if sc.elastic else f"{sc.num_workers}"
    lines = [
        f"dry run of {cfg.name}: config valid; nothing trained",
        f"runtime: {workers} worker(s) x {sc.cpus_per_worker:g} CPU, device {runtime.device_type}, "
        f"precision {runtime.precision}, attention {runtime.attention_backend}",
        f"training: {tr.steps} steps x batch {tr.batch_size} x {cfg.model.seq_len} tokens"
        f"{f' x {tr.grad_accum} micro-batches' if tr.grad_accum > 1 else ''} = "
        f"{tr.steps * tr.batch_size * tr.grad_accum * cfg.model.seq_len * sc.max_workers:,} tokens"
        f"{' at most' if sc.elastic else ''}; evaluate every "
        f"{tr.eval_every} steps",
        f"memory: estimated peak {est.total_bytes / 2**20:,.2f} MiB per worker "
        f"(in the {est.detail['peak_phase']}; `raydrat estimate` gives the breakdown)",
    ]
    lines += _data_lines(cfg)
    lines.append(_tokenizer_line(cfg))
    tk = cfg.tracking
    tracking_store.check_config(tk)  # a PostgreSQL store: a login, as the run makes before any work
    lines.append(
        f"tracking: MLflow experiment {tk.experiment!r} at "
        f"{redact_uri(tk.tracking_uri) or '$MLFLOW_TRACKING_URI or sqlite:///mlruns.db'}"
        if tk.enabled
        else "tracking: off"
    )
    return lines


def _data_lines(cfg: RaydratConfig) -> list[str]:
    d = cfg.data
    if d.prepared:
        manifest = read_manifest_at(location_for(d.prepared, d.prepared_endpoint_url), fs_path(d.prepared))
        c = manifest["counts"]
        return [
            f"data: prepared {d.prepared}: {c['train_blocks']:,} train blocks, "
            f"{c['train_tokens']:,} tokens, {c['val_stored_blocks']:,} val blocks"
        ]
    demo_dir = Path(d.demo_dir).absolute()
    absent = read_manifest(demo_dir) is None  # present: planned like any parquet folder, read only
    planned = [i for i, src in enumerate(d.sources) if not (absent and src.path == DEMO_SOURCE)]
    plan = plan_corpus(d.model_copy(update={"sources": [d.sources[i] for i in planned]})) if planned else None
    total = sum(plan.source_bytes) if plan else 0
    to_build = " and the demo corpus, to build" if len(planned) < len(d.sources) else ""
    what = (
        f"{len(plan.units)} units of work, {len(plan.files)} files, {total / 1e6:,.1f} MB by the files' metadata{to_build}"
        if plan
        else "the demo corpus, to build"
    )
    lines = [
        f"data: {what}; val: {d.val_fraction:.0%} of documents by hash (seed {d.split_seed}), from at most "
        f"{d.val_max_units} units"
    ]
    for i, src in enumerate(d.sources):
        if i not in planned:
            docs, _ = stdlib_documents()
            size = sum(len(text.encode("utf-8")) for _, text in docs)
            lines.append(
                f"  sources[{i}] demo: absent from {demo_dir}: the run builds it first from this Python's standard "
                f"library ({len(docs):,} documents, {size / 1e6:,.1f} MB; `raydrat data demo` builds it now)"
            )
            continue
        j = planned.index(i)  # its index in the plan
        units = sum(1 for u in plan.units if u.source == j)
        rows = "rows" if plan.source_formats[j] in ("parquet", "jsonl", "hf") else "files"
        share = f", weight {src.weight:g}" if src.weight else ""
        lines.append(
            f"  sources[{i}] {src.path} ({plan.source_formats[j]}): {plan.source_rows[j]:,} {rows}, "
            f"{plan.source_bytes[j] / 1e6:,.1f} MB, {units} units{share}"
        )
    for skipped in plan.skipped_files if plan else []:
        lines.append(f"  skipped (data.on_corrupt = skip): {skipped}")
    streams = stream_count(d.streams, len(plan.units) if plan else d.streams)  # a corpus still to build: data.streams
    readers = _stream_readers(streams, cfg.scaling.min_workers, cfg.scaling.max_workers)
    lines.append(
        f"order: units in a seeded order per epoch (train.seed {cfg.train.seed}), read by {streams} streams "
        f"(data.streams {d.streams}) in windows of {max(1, d.shuffle_buffer)} blocks; {readers}"
    )
    return lines


def _stream_readers(streams: int, low: int, high: int) -> str:
    """What the worker count(s) do to the reading: every unit read once when the count
    divides the streams, else some units read by several workers."""
    shared = [w for w in range(low, high + 1) if streams % w]
    if not shared:
        return "every unit is read by one worker"
    return (
        f"with {', '.join(map(str, shared))} worker(s), which do not divide {streams}, some units are read by "
        "several workers (same order; set data.streams to a multiple of the worker count)"
    )


def _tokenizer_line(cfg: RaydratConfig) -> str:
    """The tokenizer training would use, found and checked by the same functions
    (``data.eod_token`` included); the demo tokenizer of a vocab size not trained yet is
    said to be trained first."""
    path = tokenizer_location(cfg.data, cfg.model.vocab_size)
    if not cfg.data.tokenizer_path and not path.exists():
        return f"tokenizer: {path} absent: the run trains it on the demo corpus first"
    tok, eod_id = check_tokenizer(cfg.data, path, cfg.model.vocab_size)
    return (
        f"tokenizer: {path} ({tok.get_vocab_size()} tokens; end of document {tok.id_to_token(eod_id)!r}, id {eod_id})"
    )


def describe_sweep(space_path: str | Path) -> list[str]:
    """A sweep's dry run: the space loaded (a shipped name or a path), every trial drawn up
    front (random, grid) with its estimate and admission verdict, or for a model-based
    search the corners of the space checked against the budget. No Ray, no MLflow."""
    space = load_space(space_path)
    sweep = space.sweep
    gpus = expected_gpus()
    budget = f"memory budget {sweep.memory_budget_gb:g} GB" if sweep.memory_budget_gb else "no memory budget"
    lines = [
        f"dry run of sweep {sweep.name} ({space.path}): base {space.base_path.stem}, search {sweep.search}, "
        f"{sweep.num_samples} sample(s), {budget}; nothing trained"
    ]
    if sweep.search not in ("random", "grid"):
        verdicts = A.corners(space, gpus)
        A.check_budget(space, verdicts, what="corner of the space")
        lines.append(f"{len(verdicts)} corner(s) of the space admitted; the searcher proposes the trials")
        return lines
    verdicts = A.screen_drawn(space, expand(space), gpus)
    A.check_budget(space, verdicts)
    for v in verdicts:
        verdict = f"refused ({v.refused}: {v.reason})" if v.refused else "admitted"
        lines.append(f"  {v.name} {R.params_text(v.params)}: estimated {R.fmt_bytes(v.estimate)}, {verdict}")
    admitted = sum(1 for v in verdicts if v.refused is None)
    lines.append(f"{len(verdicts)} trial(s): {admitted} admitted, {len(verdicts) - admitted} refused")
    return lines
