"""Weighted mixing met in tokens: each source's share of the training tokens follows its
``weight``, whatever the files' encoding.

The plan's sizes come from metadata (parquet footers, file sizes), which can be far off the
text a source holds: a dictionary-encoded parquet column stores each distinct document once,
so a corpus with duplicates looks several times smaller than it reads. So the rates are set
from the units the up-front check reads anyway (the sampled units, spread over the corpus):
per source, the text bytes per row measured there times the rows in the footers (parquet),
or the files' sizes (text), times the tokens per byte of its sampled validation documents.
A source none of whose units is sampled keeps its metadata size and the corpus's tokens per
byte."""

from __future__ import annotations

from dataclasses import replace

from raydrat.config.data import DataConfig
from raydrat.core.data.plan import Plan, rates_for_sizes


def estimated_sizes(plan: Plan, scans: list[dict]) -> list[tuple[float, float]]:
    """Per source, its estimated ``(text bytes, tokens)`` (see the module docstring);
    ``scans``: the sampled units' :func:`~raydrat.core.data.blocks.scan_unit` rows."""
    n = len(plan.source_bytes)
    rows, text, tokens, token_bytes = ([0] * n for _ in range(4))
    for r in scans:
        if r.get("error"):
            continue
        s = int(r["source"])
        rows[s] += int(r["docs"]) + int(r["empty_docs"])
        text[s] += int(r["text_bytes"])
        tokens[s] += int(r["val_tokens"])
        token_bytes[s] += int(r["val_text_bytes"])
    overall = sum(tokens) / sum(token_bytes) if sum(token_bytes) else 0.25
    out = []
    for s in range(n):
        if plan.source_formats[s] in ("parquet", "hf") and rows[s]:
            size = plan.source_rows[s] * text[s] / rows[s]
        else:
            size = float(plan.source_bytes[s])
        out.append((size, size * (tokens[s] / token_bytes[s] if token_bytes[s] else overall)))
    return out


def estimated_tokens(plan: Plan, scans: list[dict]) -> list[float]:
    """Per source, its estimated tokens (:func:`estimated_sizes`)."""
    return [tokens for _, tokens in estimated_sizes(plan, scans)]


def with_measured_rates(cfg: DataConfig, plan: Plan, scans: list[dict]) -> Plan:
    """``plan`` with every unit's mixing rate set from :func:`estimated_tokens` (a plan of
    unweighted sources is returned as it is)."""
    if not any(s.weight for s in cfg.sources) or len(cfg.sources) == 1:
        return plan
    rates = rates_for_sizes(cfg, estimated_tokens(plan, scans))
    return replace(plan, units=[replace(u, rate=rates[u.source]) for u in plan.units])


def mixing_report(cfg: DataConfig, plan: Plan, scans: list[dict]) -> list[dict]:
    """Per source, what the run plans from measured sizes: its estimated text bytes and
    tokens, its rate, and its share of the training tokens, natural (without weights),
    target (its weight's share) and planned (rate x tokens over the total)."""
    sizes = estimated_sizes(plan, scans)
    rates = [next((u.rate for u in plan.units if u.source == s), 1.0) for s in range(len(sizes))]
    natural = sum(t for _, t in sizes) or 1.0
    planned = sum(r * t for r, (_, t) in zip(rates, sizes, strict=True)) or 1.0
    weights = [src.weight for src in cfg.sources]
    total_w = sum(w for w in weights if w) or 1.0
    return [
        {
            "path": src.path,
            "text_bytes_estimated": round(b),
            "tokens_estimated": round(t),
            "rate": r,
            "token_share_natural": t / natural,
            "token_share_target": (w / total_w) if w else t / natural,
            "token_share_planned": r * t / planned,
        }
        for src, (b, t), r, w in zip(cfg.sources, sizes, rates, weights, strict=True)
    ]
