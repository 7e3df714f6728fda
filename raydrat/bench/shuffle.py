"""``raydrat bench shuffle``: how well the training order mixes the corpus, today's global
order beside the one it replaced, on the config's corpus (default: the demo corpus).

The order it replaced, reproduced with Ray Data itself: the units in plan order, each unit's
blocks in order (what ``preserve_order`` streamed), through Ray Data's local shuffle buffer
(``iter_batches(local_shuffle_buffer_size=2048, local_shuffle_seed=train.seed + rank)``, one
worker), the same order every epoch. The global order: :mod:`raydrat.core.data.order`.

Measured over two epochs of block ids (a block's unit is ``block_id >> 32``), per
micro-batch of ``train.batch_size`` blocks:

* **units per batch**: distinct units among a batch's blocks (an i.i.d. draw of blocks
  gives nearly ``batch_size``);
* **same-unit pairs**: the share of pairs of blocks in a batch from the same unit, over what
  an i.i.d. draw gives (``sum of squared unit shares``); 1 is i.i.d., higher is clumped;
* **corpus correlation**: Spearman's rank correlation between when a block is trained on
  and where it sits in the corpus (0: unrelated; 1: the corpus in order);
* **epoch correlation**: the same between the two epochs' orders (1: every epoch alike).
"""

from __future__ import annotations

import numpy as np
import ray

from raydrat.bench.report import load_average, print_table, write_json
from raydrat.config import RaydratConfig
from raydrat.core.data.blocks import UnitStart
from raydrat.core.data.position import DataPosition
from raydrat.core.data.stream import TrainSource, WorkerBlocks, local_source
from raydrat.ray_session import ensure_ray

OLD_BUFFER = 2048
"""``data.shuffle_buffer`` of the order this replaced (its default)."""


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def quality(epochs: list[np.ndarray], batch: int, corpus_rank: dict[int, int]) -> dict[str, float]:
    """The module docstring's figures for two epochs of block ids."""
    first = epochs[0]
    units = first >> 32
    n = len(units) // batch * batch
    groups = units[:n].reshape(-1, batch)
    distinct = np.mean([len(set(g.tolist())) for g in groups])
    shares = np.bincount(np.unique(units, return_inverse=True)[1]) / len(units)
    same = np.mean(
        [
            (np.sum(np.bincount(np.unique(g, return_inverse=True)[1]) ** 2) - batch) / (batch * (batch - 1))
            for g in groups
        ]
    )
    where = np.array([corpus_rank[i] for i in first.tolist()])
    common = sorted(set(first.tolist()) & set(epochs[1].tolist()))
    at = [{i: k for k, i in enumerate(e.tolist())} for e in epochs]
    return {
        "units_per_batch": float(distinct),
        "same_unit_pairs_over_iid": float(same / np.sum(shares**2)),
        "corpus_correlation": _spearman(np.arange(len(first)), where),
        "epoch_correlation": _spearman(np.array([at[0][i] for i in common]), np.array([at[1][i] for i in common])),
    }


def _corpus_ids(source: TrainSource) -> list[int]:
    """Every training block id of an epoch, in corpus (plan) order."""
    return [int(i) for unit in source.units for run in source.runs(unit, UnitStart(), {}) for i in run.ids]


def _old_epoch(ids: list[int], batch: int, seed: int) -> np.ndarray:
    ds = ray.data.from_items([{"id": i} for i in ids], override_num_blocks=max(1, len(ids) // 4096))
    batches = ds.iter_batches(batch_size=batch, local_shuffle_buffer_size=OLD_BUFFER, local_shuffle_seed=seed)
    return np.concatenate([b["id"] for b in batches]).astype(np.int64)


def _new_epochs(source: TrainSource, seed: int) -> list[np.ndarray]:
    walk = WorkerBlocks(source, seed, DataPosition(), batch_size=1024)
    out: list[list[int]] = [[], []]
    while not all(r.cursor.epoch > 1 for r in walk.readers.values()):
        mb = next(walk)
        for i, e in zip(mb.ids.tolist(), mb.epochs.tolist(), strict=True):
            if e < 2:
                out[e].append(i)
    return [np.array(e, dtype=np.int64) for e in out]


def run_shuffle_bench(cfg: RaydratConfig, json_path: str | None = None) -> dict:
    ensure_ray()
    load = load_average()
    source = local_source(cfg.data, cfg.model.seq_len, cfg.model.vocab_size)
    ids = _corpus_ids(source)
    corpus_rank = {i: k for k, i in enumerate(ids)}
    batch, seed = cfg.train.batch_size, cfg.train.seed
    old = [_old_epoch(ids, batch, seed), _old_epoch(ids, batch, seed)]  # same seed every epoch: same order
    new = _new_epochs(source, seed)
    iid_rng = np.random.default_rng(0)
    iid = [iid_rng.permutation(np.array(ids, dtype=np.int64)) for _ in range(2)]
    rows = {
        f"before: plan order + Ray Data's {OLD_BUFFER}-block local shuffle": quality(old, batch, corpus_rank),
        f"after: global order ({source.stream_count} streams, windows of {source.window})": quality(
            new, batch, corpus_rank
        ),
        "reference: a uniform random permutation per epoch": quality(iid, batch, corpus_rank),
    }
    print_table(
        f"shuffle: {cfg.name}'s corpus, {len(source.units)} units, {len(ids):,} training blocks, batch {batch}; "
        f"load average {load}",
        ["order", "units per batch", "same-unit pairs / i.i.d.", "corpus correlation", "epoch correlation"],
        [
            [
                name,
                f"{q['units_per_batch']:.2f}",
                f"{q['same_unit_pairs_over_iid']:.1f}",
                f"{q['corpus_correlation']:+.3f}",
                f"{q['epoch_correlation']:+.3f}",
            ]
            for name, q in rows.items()
        ],
    )
    figures = {"config": cfg.name, "units": len(source.units), "blocks": len(ids), "batch": batch, "orders": rows}
    if json_path:
        write_json(json_path, figures)
    return figures
