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


def estimated_tokens(plan: Plan, scans: list[dict]) -> list[float]:
    """Per source, its estimated tokens (see the module docstring); ``scans``: the sampled
    units' :func:`~raydrat.core.data.blocks.scan_unit` rows."""
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
        if plan.source_formats[s] == "parquet" and rows[s]:
            size = plan.source_rows[s] * text[s] / rows[s]
        else:
            size = float(plan.source_bytes[s])
        out.append(size * (tokens[s] / token_bytes[s] if token_bytes[s] else overall))
    return out


def with_measured_rates(cfg: DataConfig, plan: Plan, scans: list[dict]) -> Plan:
    """``plan`` with every unit's mixing rate set from :func:`estimated_tokens` (a plan of
    unweighted sources is returned as it is)."""
    if not any(s.weight for s in cfg.sources) or len(cfg.sources) == 1:
        return plan
    rates = rates_for_sizes(cfg, estimated_tokens(plan, scans))
    return replace(plan, units=[replace(u, rate=rates[u.source]) for u in plan.units])
