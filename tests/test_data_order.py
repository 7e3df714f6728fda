"""The global training order and its positions, without Ray: the same order for any number
of workers, any position resumed at any worker count with nothing repeated or skipped, every
epoch its own order, a resume that reads a bounded amount whatever the position, and
positions that survive a checkpoint's JSON."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_data import SEQ_LEN, VOCAB, data_cfg, make_docs, write_parquet

from raydrat.core.checkpoint.state import load_position, save_position
from raydrat.core.data import read as read_module
from raydrat.core.data.blocks import iter_blocks_local
from raydrat.core.data.errors import DataError
from raydrat.core.data.order import stream_units, unit_order, worker_streams
from raydrat.core.data.position import DataPosition, merge
from raydrat.core.data.stream import TrainSource, WorkerBlocks, epoch_blocks, local_source, position_at
from raydrat.core.data.tokenizer import train_tokenizer

SEED = 1337
BATCH = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Eight units (parquet row groups of 40 documents) and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("order")
    docs = make_docs(320, seed=3)
    write_parquet(root / "c" / "a.parquet", docs, row_group_size=40)
    tok = root / "tok.json"
    train_tokenizer([d for d in docs if d], VOCAB, tok)
    return {"dir": root / "c", "docs": docs, "tokenizer": tok}


def make_source(corpus: dict, **kw) -> TrainSource:
    return local_source(data_cfg(corpus, shuffle_buffer=kw.pop("shuffle_buffer", 16), **kw), SEQ_LEN, VOCAB)


def run(source: TrainSource, world: int, micro_batches: int, position: DataPosition | None = None, seed: int = SEED):
    """Every worker of ``world`` takes ``micro_batches`` micro-batches from ``position``:
    ``{global position: block id}`` of what they took, and the merged position after."""
    position = position or DataPosition()
    workers = [WorkerBlocks(source, seed, position, r, world, BATCH) for r in range(world)]
    taken: dict[int, int] = {}
    for _ in range(micro_batches):
        for w in workers:
            mb = next(w)
            assert len(mb.ids) == BATCH
            for p, i in zip(mb.positions.tolist(), mb.ids.tolist(), strict=True):
                assert p not in taken, f"position {p} taken twice"
                taken[p] = i
    saved = [w.position().to_json() for w in workers]
    return taken, merge(saved, "test")


def test_the_order_is_the_same_for_any_worker_count(corpus):
    source = make_source(corpus)
    assert source.stream_count == 6  # 12 lowered to its largest divisor <= 8 units
    one, _ = run(source, 1, 60)
    assert sorted(one) == list(range(240))
    for world in (2, 3, 4, 5):  # 4 and 5 do not divide 6 streams: shared streams, same order
        many, _ = run(source, world, 60 // world)
        assert many == {p: one[p] for p in many}, world
    assert worker_streams(6, 0, 2) == [0, 2, 4] and worker_streams(6, 1, 3) == [1, 4]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3), (3, 2), (1, 4)])
def test_a_position_resumes_at_any_worker_count_with_nothing_repeated_or_skipped(corpus, before, after):
    source = make_source(corpus)
    reference, _ = run(source, 1, 200)
    rng = random.Random(before * 10 + after)
    for micro_batches in (1, rng.randint(2, 20), rng.randint(40, 90)):
        first, position = run(source, before, micro_batches)
        assert position == position_at(source, SEED, position.blocks)  # the cursors are those of a walk from 0
        second, _ = run(source, after, 12, position)
        taken = {**first, **second}
        assert len(taken) == len(first) + len(second)  # no position twice
        assert sorted(taken) == list(range(len(taken)))  # none skipped
        assert taken == {p: reference[p] for p in taken}  # the very blocks of the uninterrupted order


def test_every_epoch_has_its_own_order_and_the_seed_reproduces_it(corpus):
    source = make_source(corpus)
    local = Counter(tuple(b) for b in iter_blocks_local(data_cfg(corpus), SEQ_LEN, VOCAB, "train"))
    epochs = [epoch_blocks(source, SEED, e) for e in (0, 1)]
    for blocks in epochs:  # each epoch is every training block exactly once
        assert Counter(tuple(b.tolist()) for _, b in blocks) == local
    ids = [[i for i, _ in blocks] for blocks in epochs]
    assert ids[0] != ids[1]
    assert [i for i, _ in epoch_blocks(source, SEED, 1)] == ids[1]  # reproduced
    assert [i for i, _ in epoch_blocks(source, SEED + 1, 0)] != ids[0]  # another seed, another order
    assert not np.array_equal(unit_order(SEED, 0, 8), unit_order(SEED, 1, 8))
    # the streams share each epoch's units: each unit once
    assert sorted(u for c in range(6) for u in stream_units(SEED, 3, 8, 6, c)) == list(range(8))


def test_a_resume_reads_a_bounded_amount_whatever_the_position(corpus, monkeypatch):
    """Resuming reads, per stream, the units from the chunk its window starts in: the
    characters read to produce the first micro-batch do not grow with the position."""
    source = make_source(corpus)
    read = {"chars": 0}
    real = read_module.unit_pieces

    def counting(*args, **kwargs):
        for piece in real(*args, **kwargs):
            read["chars"] += len(piece.text)
            yield piece

    monkeypatch.setattr("raydrat.core.data.blocks.unit_pieces", counting)
    corpus_chars = sum(len(d) for d in corpus["docs"] if d)
    costs = {}
    for micro_batches in (3, 150, 400):  # early, in the second epoch, in the seventh
        _, position = run(source, 1, micro_batches)
        read["chars"] = 0
        next(WorkerBlocks(source, SEED, position, 0, 1, BATCH))
        costs[micro_batches] = read["chars"]
    # at most the 6 streams' current units (corpus / 8 each) and the units their windows reach
    assert max(costs.values()) < corpus_chars, (costs, corpus_chars)
    assert costs[400] < 2 * max(costs[3], corpus_chars / 4), costs


def test_positions_round_trip_through_the_checkpoint_files(corpus, tmp_path: Path):
    source = make_source(corpus)
    _, position = run(source, 2, 7)
    workers = [WorkerBlocks(source, SEED, DataPosition(), r, 2, BATCH) for r in range(2)]
    for _ in range(7):
        for w in workers:
            next(w)
    for rank, w in enumerate(workers):
        save_position(tmp_path, w.position(), rank)
    loaded = load_position(tmp_path)
    assert loaded == position and loaded.blocks == 7 * 2 * BATCH
    other = make_source(corpus, streams=4)  # data.streams changed: the position is refused
    with pytest.raises(DataError, match=r"for 8 units in 6 streams but the corpus now has 8 units in 4 streams"):
        WorkerBlocks(other, SEED, loaded, 0, 1, BATCH)


def test_windows_shuffle_within_a_stream_and_mix_the_streams(corpus):
    """Consecutive micro-batches draw on several units at once (one window per stream), and
    a block's place in the epoch is unrelated to its place in the corpus."""
    source = make_source(corpus)
    blocks = epoch_blocks(source, SEED, 0)
    units = [i >> 32 for i, _ in blocks]
    per_batch = [len(set(units[k : k + BATCH])) for k in range(0, len(units) - BATCH, BATCH)]
    assert np.mean(per_batch) > 3  # 4 blocks from 6 streams: nearly always 4 units
    corpus_rank = np.argsort(np.argsort([i for i, _ in blocks]))
    rho = np.corrcoef(corpus_rank, np.arange(len(blocks)))[0, 1]
    assert abs(rho) < 0.3, rho
