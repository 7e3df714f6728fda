"""``raydrat bench model --learning``: learning per token, raydrat's model against the
nanoGPT reference, on the same tokens.

Both models train the recipe's corpus for ``train.steps`` steps on the same batches in the
same order (tokenized once, :class:`~raydrat.bench.local.LocalData`), one step of each in
turn, with the same step (:func:`raydrat.core.step.train_step`: the recipe's AdamW, learning
rate schedule and gradient clipping) from the same seed; every ``train.eval_every`` steps
and at the end each is evaluated on the same validation blocks
(:func:`raydrat.core.step.evaluate`). raydrat's model is the recipe's (its default
architecture); the nanoGPT reference has the recipe's width, depth, heads, sequence and
vocabulary (:func:`~raydrat.bench.peers.nanogpt_settings`). The verdict: raydrat's final
validation loss is the same as the reference's or lower (not worse), or higher (worse).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from raydrat.bench.local import LocalData
from raydrat.bench.peers import NanoGPT, nanogpt_settings
from raydrat.bench.report import print_table
from raydrat.bench.rounds import Load
from raydrat.config.run import RaydratConfig
from raydrat.core.evaluate import evaluate
from raydrat.core.model.transformer import GPT
from raydrat.core.optim import build_optimizer, lr_at, set_lr
from raydrat.core.step import train_step
from raydrat.tables import write_json


def run_learning(cfg: RaydratConfig, json_path: str | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train both models in turn; one row per evaluation (step, each one's val loss)."""
    tc, oc = cfg.train, cfg.optim
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    data = LocalData.load(cfg)
    models = {}
    for name, make in (
        ("raydrat", lambda: GPT(cfg.model)),
        ("nanogpt", lambda: NanoGPT.like(nanogpt_settings(cfg.model))),
    ):
        torch.manual_seed(tc.seed)
        model = make().train()
        models[name] = (model, build_optimizer(model, oc))
    load = Load()
    log(f"[bench model learning] {cfg.name}: {tc.steps} steps each, in turn, on {len(data.train)} batches")
    rows = []
    for step in range(tc.steps):
        batch = data.train[step % len(data.train)]
        for model, optimizer in models.values():
            set_lr(optimizer, lr_at(step, oc, tc.steps))
            train_step(model, optimizer, [batch], oc.grad_clip)
        done = step + 1
        if done % tc.eval_every == 0 or done == tc.steps:
            losses = {name: evaluate(m, data.val, tc.eval_batches).loss for name, (m, _) in models.items()}
            rows.append({"step": done, "tokens": done * batch.shape[0] * (batch.shape[1] - 1), **losses})
            log(f"  step {done}: val raydrat {losses['raydrat']:.4f}, nanogpt {losses['nanogpt']:.4f}")
    load.finish()
    last = rows[-1]
    verdict = "not worse" if last["raydrat"] <= last["nanogpt"] else "worse"
    print_table(
        f"learning per token: {cfg.name}, val loss on the same {tc.eval_batches} validation batches",
        ["step", "tokens", "raydrat", "nanogpt reference", "raydrat - nanogpt"],
        [
            [
                r["step"],
                f"{r['tokens']:,}",
                f"{r['raydrat']:.4f}",
                f"{r['nanogpt']:.4f}",
                f"{r['raydrat'] - r['nanogpt']:+.4f}",
            ]
            for r in rows
        ],
        footer=f"raydrat's model ({cfg.model.activation}, {cfg.model.norm}, {cfg.model.kv_heads} kv heads) against "
        f"the nanoGPT reference at the same width, depth and vocabulary, the same batches in the same order: "
        f"{verdict} at step {last['step']}. {load.text()}",
    )
    if json_path:
        write_json(json_path, {"rows": rows, "verdict": verdict, "config": cfg.name, "load_average": load.as_list()})
    return rows
