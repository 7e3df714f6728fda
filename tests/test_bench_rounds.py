"""The benchmarks' timing discipline: interleaved rounds long enough to time, ratios paired
round by round, and no verdict where the spread is wider than the margin."""

from __future__ import annotations

import time

import pytest

from raydrat.bench import rounds as R


def busy(seconds: float):
    """Work that takes ``seconds`` of this process's CPU time."""

    def run():
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    return run


def test_rounds_interleave_rotate_and_last_long_enough():
    calls: list[str] = []

    def work(name, seconds):
        spin = busy(seconds)

        def run():
            calls.append(name)
            spin()

        return run

    lines: list[str] = []
    series = R.run_rounds(
        {"a": work("a", 0.002), "b": work("b", 0.006)}, rounds=5, round_s=0.03, warmup=1, log=lines.append
    )
    ka, kb = (int(part.split()[-1]) for part in lines[0].split(":")[1].split(","))
    # a round repeats the work to fill round_s, sized from the warm-up call's wall time
    assert ka >= kb >= 1 and ka > 1
    # one warm-up call each, then rounds a b | b a | a b | b a | a b: the first rotated
    expected = []
    for r in range(5):
        for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
            expected += [name] * (ka if name == "a" else kb)
    assert calls == ["a", "b", *expected]
    for s in series.values():
        assert len(s.wall) == len(s.cpu) == 5
    # CPU time of the work, per unit: b is three times a
    assert R.speed_ratio(series["a"], series["b"], "cpu").median == pytest.approx(3.0, rel=0.25)


def test_too_few_rounds_give_no_ratio():
    with pytest.raises(ValueError, match="at least 5 rounds"):
        R.run_rounds({"a": lambda: None}, rounds=3)
    s = R.Series("a", [1.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="at least 5"):
        R.speed_ratio(s, s, "cpu")


def test_ratio_is_paired_by_round():
    """A round where the machine was slow for both does not move the paired ratio."""
    ours = R.Series("ours", wall=[1.0, 2.0, 1.0, 3.0, 1.0], cpu=[1.0, 1.0, 1.0, 1.0, 1.0])
    ref = R.Series("ref", wall=[1.1, 2.2, 1.1, 3.3, 1.1], cpu=[1.2, 1.2, 1.2, 1.2, 1.2])
    wall = R.speed_ratio(ours, ref, "wall")
    assert (wall.low, wall.median, wall.high) == pytest.approx((1.1, 1.1, 1.1))
    assert R.speed_ratio(ours, ref, "cpu").median == pytest.approx(1.2)
    assert ours.rate(100, "wall").text("{:.0f}", "") == "100 (33-100)"


def test_verdict_only_when_the_margin_is_wider_than_the_spread():
    clear = R.Spread.of([1.08, 1.10, 1.12, 1.09, 1.11])
    v = R.verdict(clear, 1.0)
    assert v.holds is True and v.text.startswith("ahead")
    behind = R.verdict(R.Spread.of([0.90, 0.92, 0.91, 0.93, 0.89]), 1.0)
    assert behind.holds is False and behind.text.startswith("behind")
    noisy = R.verdict(R.Spread.of([0.95, 1.03, 1.04, 1.10, 1.02]), 1.0)
    assert noisy.holds is None
    assert "spread +/-0.075" in noisy.text and "margin 0.030" in noisy.text


def test_steps_grouped_into_rounds_pair_across_contenders():
    wall = [0.1] * 10 + [0.3] * 3
    s = R.Series.from_steps("x", wall, [w / 2 for w in wall], rounds=5)
    assert len(s.wall) == 5
    assert s.wall[0] == pytest.approx(0.1) and s.wall[-1] == pytest.approx(0.3)
    assert s.cpu == pytest.approx([w / 2 for w in s.wall])
    assert len(R.Series.from_steps("y", [0.1] * 3, [0.1] * 3, rounds=5).wall) == 3


def test_load_is_read_at_start_and_end():
    load = R.Load()
    text = load.finish().text()
    assert text.startswith("load average ") and "(start)" in text and "(end)" in text
    assert len(load.as_list()) == 2
