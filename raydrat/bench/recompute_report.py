"""``raydrat bench recompute``'s judgement and tables: each raydrat compiled budget row
against ``torch.compile`` + ``activation_memory_budget`` at the same fraction, and the
printed tables, from the JSON rows alone (so a ``--json`` file prints the same tables again).

The goal (:func:`judge`), per raydrat compiled ``budget`` row:

- **bytes**: it stores no more than torch's row at that fraction (the allocator's bytes,
  exact: no spread);
- **compile**: step 0's CPU seconds (compile, and the cost measurement when the plan was not
  served by the plan cache) within :data:`COMPILE_GOAL` times torch's; one compile each, so
  one figure each, judged as it stands;
- **step time**: torch's step CPU time over raydrat's, paired round by round
  (:func:`raydrat.bench.rounds.speed_ratio`), judged by :func:`raydrat.bench.rounds.verdict`:
  at least 1 (raydrat no slower) only where the margin is wider than the spread; otherwise
  no verdict, and the spread and margin are printed.
"""

from __future__ import annotations

from collections.abc import Sequence

from raydrat.bench.report import print_table
from raydrat.bench.rounds import MIN_ROUNDS, VERDICT_RULE, Series, Spread, speed_ratio, verdict

COMPILE_GOAL = 2.0
"""raydrat's compiled plan compiles (planning included) within this factor of torch's budget."""


def step0_cpu_s(r: dict) -> float:
    """Step 0's CPU seconds, with the cost measurement the plan came from (none when cached)."""
    return r["compile_cpu_s"] + (r.get("plan_cpu_s") or 0.0)


def per_round(ours: Sequence[float], ref: Sequence[float]) -> Spread | None:
    """``ours`` over ``ref``, round by round (paired by index), median and min-max; ``None``
    without rounds."""
    ratios = [a / b for a, b in zip(ours, ref) if b > 0]
    return Spread.of(ratios) if ratios else None


def own(values: Sequence[float]) -> Spread | None:
    return Spread.of(values) if values else None


def series(r: dict) -> Series:
    return Series(r["variant"], list(r["round_wall_s"]), list(r["round_cpu_s"]))


def torch_peer(r: dict, rows: Sequence[dict]) -> dict | None:
    """torch's compiled budget row at ``r``'s fraction, same model (``None`` if it has no bytes)."""
    return next(
        (
            p
            for p in rows
            if p["model"] == r["model"]
            and p["planner"] == "torch"
            and p["mode"] == "budget"
            and p["compiled"]
            and p["budget_fraction"] == r["budget_fraction"]
            and p["saved_bytes"] is not None
        ),
        None,
    )


def judge(r: dict, rows: Sequence[dict]) -> dict | None:
    """The goal's figures and verdict for a raydrat compiled budget row (``None`` for any
    other row, or when torch's row at that fraction is missing)."""
    if r["planner"] != "raydrat" or r["mode"] != "budget" or not r["compiled"] or r["saved_bytes"] is None:
        return None
    peer = torch_peer(r, rows)
    if peer is None:
        return None
    compile_ratio = step0_cpu_s(r) / max(step0_cpu_s(peer), 1e-9)
    rounds = min(len(r["round_cpu_s"]), len(peer["round_cpu_s"]))
    if rounds >= MIN_ROUNDS:
        speed = speed_ratio(series(r), series(peer), "cpu")
        speed_verdict = verdict(speed, 1.0, ahead="no slower", behind="slower")
    else:
        speed, speed_verdict = None, None
    bytes_ok = r["saved_bytes"] <= peer["saved_bytes"]
    compile_ok = compile_ratio <= COMPILE_GOAL
    short = [
        *([] if bytes_ok else [f"stores {(r['saved_bytes'] - peer['saved_bytes']) / 2**20:.2f} MiB more"]),
        *([] if compile_ok else [f"compiles in {compile_ratio:.2f}x torch's CPU time (goal <= {COMPILE_GOAL:g}x)"]),
        *([speed_verdict.text] if speed_verdict is not None and speed_verdict.holds is False else []),
    ]
    if speed_verdict is None:
        undecided = f"step time: {rounds} rounds, a ratio needs at least {MIN_ROUNDS}"
    elif speed_verdict.holds is None:
        undecided = f"step time: {speed_verdict.text.removeprefix('no verdict: ')}"
    else:
        undecided = ""
    if short:
        holds, text = False, "short: " + "; ".join(short) + (f" (and no verdict on {undecided})" if undecided else "")
    elif undecided:
        holds, text = None, f"no verdict on {undecided}"
    else:
        holds, text = True, f"meets: {speed_verdict.text}"
    return {
        "torch_variant": peer["variant"],
        "bytes_ok": bytes_ok,
        "compile_cpu_ratio": compile_ratio,
        "compile_wall_ratio": r["compile_s"] / max(peer["compile_s"], 1e-9),
        "compile_ok": compile_ok,
        "speed_vs_torch": None if speed is None else speed.as_dict(),
        "speed_holds": None if speed_verdict is None else speed_verdict.holds,
        "holds": holds,
        "verdict": text,
    }


def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def _spread(s: Spread | None, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    if s is None:
        return "-"
    return Spread(scale * s.median, scale * s.low, scale * s.high, s.n).text(fmt, unit="")


def _spread_args(d: dict) -> dict:
    return {"median": d["median"], "low": d["min"], "high": d["max"], "n": d["rounds"]}


def _step0(r: dict) -> str:
    if r.get("compile_cpu_s") is None:
        return "-"
    plan = f" + {r['plan_cpu_s']:.1f}" if r.get("plan_cpu_s") else ""
    return f"{r['compile_cpu_s']:.1f}{plan}"


def _wall(r: dict) -> str:
    return "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"


def _rows_table(model: str, mine: list[dict]) -> None:
    loads = dict.fromkeys(" / ".join(r["load_average"]) for r in mine if r.get("load_average"))
    none = next((r for r in mine if r["variant"] == "none" and r.get("round_cpu_s")), None)
    ref = {"round_cpu_s": [], "round_wall_s": []} if none is None else none
    print_table(
        f"{model}: bytes (allocator: saved = left by step 1's forward phase; peak = step 1's), step 0 "
        "(compile and planning), step time (this thread's CPU time) and step time over eager none's "
        "in the same round (CPU time, wall clock); medians (min-max) over the rounds",
        [
            "variant",
            "planner",
            "fraction",
            "budget MiB",
            "predicted MiB",
            "saved MiB",
            "peak MiB",
            "step 0 CPU s [+ plan]",
            "step 0 wall s",
            "inductor cache",
            "plan",
            "CPU ms/step",
            "CPU time / none",
            "wall time / none",
            "note",
        ],
        [
            [
                r["variant"],
                r["planner"],
                "-" if r["budget_fraction"] is None else f"{r['budget_fraction']:g}",
                mib(r["budget_bytes"]),
                mib(r["predicted_bytes"]),
                mib(r["saved_bytes"]),
                mib(r["peak_bytes"]),
                _step0(r),
                _wall(r),
                r.get("inductor_cache") or "-",
                r.get("plan") or "-",
                _spread(own(r.get("round_cpu_s") or []), 1e3, "{:.0f}"),
                _spread(per_round(r.get("round_cpu_s") or [], ref["round_cpu_s"])),
                _spread(per_round(r.get("round_wall_s") or [], ref["round_wall_s"])),
                r["note"],
            ]
            for r in mine
        ],
        "step 0: CPU seconds of this process and the compile workers and compilers it starts "
        "(+ the op cost measurement, when the plan was planned from it: plan measured; none when the "
        "plan cache served it: plan cached); inductor cache: hit when its FX graph cache served every "
        "graph, miss when it compiled them; load average before / after the timed rounds: " + ", ".join(loads),
    )


def _goal_table(model: str, mine: list[dict]) -> None:
    judged = [(r, g) for r in mine if (g := judge(r, mine)) is not None]
    if not judged:
        return
    by_variant = {r["variant"]: r for r in mine}
    rows = []
    for r, g in judged:
        t = by_variant[g["torch_variant"]]
        rows.append(
            [
                r["variant"],
                f"{r['budget_fraction']:g}",
                f"{mib(r['saved_bytes'])} / {mib(t['saved_bytes'])}",
                f"{mib(r['peak_bytes'])} / {mib(t['peak_bytes'])}",
                f"{r.get('plan') or '-'}, {r.get('inductor_cache') or '-'} / {t.get('inductor_cache') or '-'}",
                f"{step0_cpu_s(r):.1f} / {step0_cpu_s(t):.1f} ({g['compile_cpu_ratio']:.2f}x)",
                f"{r['compile_s']:.1f} / {t['compile_s']:.1f} ({g['compile_wall_ratio']:.2f}x)",
                _spread(None if g["speed_vs_torch"] is None else Spread(**_spread_args(g["speed_vs_torch"]))),
                g["verdict"],
            ]
        )
    print_table(
        f"{model}: raydrat's compiled plan against torch.compile + activation_memory_budget at the same "
        f"fraction (goal: no more bytes, step 0 within {COMPILE_GOAL:g}x torch's CPU time, step time no "
        "slower), raydrat / torch",
        [
            "raydrat variant",
            "fraction",
            "saved MiB",
            "peak MiB",
            "plan, inductor cache",
            "step 0 CPU s",
            "step 0 wall s",
            "speed vs torch",
            "verdict",
        ],
        rows,
        "speed vs torch: torch's step CPU time over raydrat's in the same round (above 1: raydrat faster), "
        "median (min-max); step 0: one compile each, judged as measured; "
        + VERDICT_RULE.format(goal=1).replace("verdict:", "step time verdict:", 1),
    )


def print_rows(rows: list[dict]) -> None:
    """Per model: every row, then the goal table."""
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        _rows_table(model, mine)
        _goal_table(model, mine)
