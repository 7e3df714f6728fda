"""The global order of the training blocks: a pure function of ``(train.seed, epoch)`` and the
corpus, the same for any number of workers, any scheduling and any restart.

* **Units, per epoch.** Epoch ``e`` visits the corpus's ``N`` units in a seeded permutation
  ``P_e`` (a sort by a 64-bit hash of ``(seed, e, unit)``): every epoch has its own order.
* **Streams.** ``S`` canonical *streams* (``data.streams``, lowered to its largest divisor
  that is at most ``N``: :func:`stream_count`) share the units: stream ``c`` reads
  ``P_e[c], P_e[c + S], ...`` in epoch ``e``, then goes on into epoch ``e + 1``. A stream is
  a sequence of blocks: its units' training blocks, unit after unit.
* **Local shuffle.** A stream's blocks are cut into *windows* of ``data.shuffle_buffer``
  blocks (a window may span units and epochs); window ``w`` of stream ``c`` is emitted in a
  seeded permutation of its blocks (a sort by a hash of ``(seed, c, w, i)``).
* **Interleave.** Global position ``g`` holds the next block of stream ``g mod S``. The world
  consumes positions in order: with ``W`` workers, worker ``r`` takes positions ``n + r,
  n + r + W, ...`` from the position ``n`` it started at, ``batch_size`` of them per
  micro-batch, so after every micro-batch the world has consumed a prefix of the order.

Worker ``r`` of ``W`` reads only the streams its positions reach: ``c ≡ n + r (mod gcd(W, S))``.
When ``W`` divides ``S`` every stream has one reader and every unit is read once; otherwise a
stream is read by ``W / gcd(W, S)`` workers, each keeping its own positions
(:func:`worker_streams`). Nothing in the order depends on ``W``."""

from __future__ import annotations

import math

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_UNITS, _WINDOW = 1, 2  # domain tags: permutations of units and of windows never share a hash


def mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained): the order's only randomness."""
    h = 0
    for v in values:
        h = _splitmix(h ^ ((v * _GOLDEN) & 0xFFFFFFFFFFFFFFFF))
    return h


def _splitmix(z: int) -> int:
    z = (z + _GOLDEN) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _hashes(key: int, n: int) -> np.ndarray:
    """``n`` 64-bit hashes of ``(key, 0), (key, 1), ...`` (vectorised splitmix64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permutation(key: int, n: int) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``key``: the indices sorted by hash (ties,
    vanishingly rare, by index), the same on every machine and numpy version."""
    return np.argsort(_hashes(key, n), kind="stable")


def unit_order(seed: int, epoch: int, n_units: int) -> np.ndarray:
    """``P_epoch``: the order in which epoch ``epoch`` visits the units."""
    return permutation(mix(_UNITS, seed, epoch), n_units)


def window_order(seed: int, stream: int, window: int, n: int) -> np.ndarray:
    """The order in which window ``window`` of stream ``stream`` emits its ``n`` blocks."""
    return permutation(mix(_WINDOW, seed, stream, window), n)


def stream_count(streams: int, n_units: int) -> int:
    """Streams in use: the largest divisor of ``data.streams`` that is at most the number of
    units (so a small corpus keeps every worker count that divides ``data.streams`` exact)."""
    return max(d for d in range(1, streams + 1) if streams % d == 0 and d <= max(1, n_units))


def stream_units(seed: int, epoch: int, n_units: int, streams: int, stream: int) -> np.ndarray:
    """The units stream ``stream`` of ``streams`` reads in epoch ``epoch``, in order."""
    return unit_order(seed, epoch, n_units)[stream::streams]


def worker_streams(streams: int, rank: int, world: int, start: int = 0) -> list[int]:
    """The streams worker ``rank`` of ``world`` reads when the world starts at global
    position ``start``: those its positions ``start + rank + k * world`` reach."""
    g = math.gcd(world, streams)
    return [c for c in range(streams) if c % g == (start + rank) % g]


def records_stream(streams: int, stream: int, rank: int, world: int, start: int = 0) -> bool:
    """Whether worker ``rank`` writes ``stream``'s cursor into a checkpoint: the lowest rank
    among the stream's readers, so every stream is written exactly once."""
    return (stream - start) % math.gcd(world, streams) == rank
