"""Progress lines of the commands that work for a while (raydrat.progress), on a clock the
test moves: quiet while the work is short, then a line per interval with the rate and what
is left, and the totals at the end."""

from __future__ import annotations

import io

from raydrat.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_short_work_prints_nothing():
    clock, out = Clock(), io.StringIO()
    p = Progress("eval", "batches", 10, tokens_per_unit=64, every_s=5.0, out=out, clock=clock)
    for i in range(1, 11):
        clock.now += 0.4  # 4 s in all: under the interval
        p.update(i)
    p.finish()
    assert out.getvalue() == ""


def test_long_work_prints_a_line_per_interval_with_its_rate_and_the_totals():
    clock, out = Clock(), io.StringIO()
    p = Progress("eval", "batches", 40, tokens_per_unit=64, every_s=5.0, out=out, clock=clock)
    for i in range(1, 41):
        clock.now += 0.5  # 2 batches/s: a line every 10 batches
        p.update(i)
    p.finish()
    assert out.getvalue().splitlines() == [
        "eval: 10/40 batches, 2.0 batches/s, 128 tokens/s, about 15s left",
        "eval: 20/40 batches, 2.0 batches/s, 128 tokens/s, about 10s left",
        "eval: 30/40 batches, 2.0 batches/s, 128 tokens/s, about 5s left",
        "eval: 40/40 batches, 2.0 batches/s, 128 tokens/s, about 0s left",
        "eval: 40 batches in 20.0s, 2.0 batches/s, 128 tokens/s",
    ]


def test_without_a_total_or_tokens_the_line_has_the_count_and_its_rate():
    clock, out = Clock(), io.StringIO()
    p = Progress("generate", "tokens", every_s=1.0, out=out, clock=clock)
    clock.now += 2.0
    p.update(50)
    p.finish()
    assert out.getvalue().splitlines() == [
        "generate: 50 tokens, 25.0 tokens/s",
        "generate: 50 tokens in 2.0s, 25.0 tokens/s",
    ]
