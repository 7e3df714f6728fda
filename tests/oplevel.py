"""What the op-level recomputation tests share: a 2-layer debug model, its tokens and its
measured op costs (without SAC's own overhead: the eager planner then uses op-level regions
even on this tiny model), and a fresh model with the same initial weights."""

from __future__ import annotations

import dataclasses

import torch

from raydrat.config import load_config
from raydrat.core.model.transformer import GPT
from raydrat.core.techniques.recompute.op_measure import measure_op_costs


def fresh(mcfg):
    torch.manual_seed(0)
    return GPT(mcfg).train()


def measured_setup():
    """``(model config, tokens of 4 sequences, measured op costs)``, on one thread."""
    torch.set_num_threads(1)
    mcfg = load_config("debug", ["model.n_layer=2"]).model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mcfg.vocab_size, (4, mcfg.seq_len + 1), generator=g)
    costs = measure_op_costs(fresh(mcfg), tokens[:, :-1], tokens[:, 1:], repeats=1)
    return mcfg, tokens, dataclasses.replace(costs, sac_op_overhead_s=0.0, sac_save_overhead_s=0.0)
