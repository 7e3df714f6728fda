"""The slot schedule: which transformer layers (slots) run in a training step.

Applied from outside the model through ``GPT.forward(..., active_slots=...)``: skipping a
layer never renames parameters. Evaluation always runs every layer (``evaluate`` passes
no ``active_slots``). Modes (``SlotsConfig.mode``):

* ``all``: every layer.
* ``layerdrop``: each layer kept independently with probability ``keep`` (Fan et al.
  2019); at least one layer always runs.
* ``progressive``: progressive layer dropping (Zhang & He 2020): the global keep
  probability ``theta(t) = (1 - floor) * exp(-decay * t / steps) + floor`` decays from 1,
  and layer ``i`` (0-based, of L) is kept with ``1 - (i + 1) / L * (1 - theta(t))``:
  deeper layers are dropped more; the deepest reaches ``floor``.
* ``adaptive``: starts with ``start_slots`` layers (evenly spaced, first and last
  included); adds one when the smoothed loss has not improved by ``plateau_tol``
  (relative) for ``patience`` steps; removes one when the measured activation memory
  exceeds ``memory_limit_mb``; always within [``min_slots``, ``max_slots``].
* ``fixed``: the listed layers.
"""

from __future__ import annotations

import math

import torch

from raydrat.config.slots import SlotsConfig
from raydrat.core import metrics as M
from raydrat.core.techniques.base import Technique


def evenly_spaced(k: int, n: int) -> list[int]:
    """``k`` layer indices out of ``n``, evenly spaced, first and last included."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


class SlotSchedule(Technique):
    """Plans the active slots of each step (:meth:`plan`, then :meth:`forward_kwargs` for
    the model); :meth:`observe` feeds back the loss and memory (adaptive mode)."""

    name = "slots"

    def __init__(self, cfg: SlotsConfig, n_layer: int, total_steps: int, seed: int = 0):
        self.cfg = cfg
        self.active: list[int] | None = None
        self.n = n_layer
        self.total_steps = max(1, total_steps)
        self.gen = torch.Generator().manual_seed(seed)
        self.max_slots = min(n_layer, cfg.max_slots or n_layer)
        self.k = cfg.start_slots or cfg.min_slots
        self._best = math.inf
        self._ema: float | None = None
        self._since_best = 0
        self.changes = 0

    def keep_probs(self, step: int) -> list[float]:
        """Per-layer keep probability at ``step`` (layerdrop / progressive)."""
        c = self.cfg
        if c.mode == "layerdrop":
            return [c.keep] * self.n
        if c.mode == "progressive":
            theta = (1 - c.floor) * math.exp(-c.decay * step / self.total_steps) + c.floor
            return [1 - (i + 1) / self.n * (1 - theta) for i in range(self.n)]
        return [1.0] * self.n

    def plan(self, step: int) -> list[int] | None:
        """The layers to run at ``step`` (``None``: all), kept for :meth:`forward_kwargs`."""
        self.active = self._draw(step)
        return self.active

    def forward_kwargs(self) -> dict:
        """The model's keyword arguments for the planned step."""
        return {} if self.active is None else {"active_slots": self.active}

    def metrics(self) -> dict[str, float]:
        if self.cfg.mode == "all":
            return {}
        return {M.ACTIVE_SLOTS: float(self.n if self.active is None else len(self.active))}

    def _draw(self, step: int) -> list[int] | None:
        mode = self.cfg.mode
        if mode == "all":
            return None
        if mode == "fixed":
            return sorted(self.cfg.fixed or [])
        if mode == "adaptive":
            return evenly_spaced(self.k, self.n)
        probs = torch.tensor(self.keep_probs(step))
        kept = (torch.rand(self.n, generator=self.gen) < probs).nonzero().flatten().tolist()
        if not kept:  # never run zero layers: keep the likeliest one
            kept = [int(torch.argmax(probs))]
        return kept

    def observe(self, loss, activation_bytes: int | None = None) -> None:
        """Adaptive mode's feedback (ignored by the other modes: a tensor ``loss`` is only
        synchronised to the host here, when adaptive slots need it)."""
        c = self.cfg
        if c.mode != "adaptive":
            return
        loss = float(loss)
        if c.memory_limit_mb is not None and activation_bytes is not None:
            if activation_bytes > c.memory_limit_mb * 2**20 and self.k > c.min_slots:
                self.k -= 1
                self.changes += 1
                self._since_best = 0
                return
        self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
        if self._ema < self._best * (1 - c.plateau_tol):
            self._best = self._ema
            self._since_best = 0
        else:
            self._since_best += 1
        if self._since_best >= c.patience and self.k < self.max_slots:
            self.k += 1
            self.changes += 1
            self._since_best = 0
            self._best = self._ema  # a new plateau is measured from here

    def state_dict(self) -> dict:
        """The RNG (layerdrop/progressive draws) and the adaptive counters."""
        return {
            "k": self.k,
            "gen": self.gen.get_state(),
            "best": self._best,
            "ema": self._ema,
            "since_best": self._since_best,
            "changes": self.changes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.k, self._best, self._ema = state["k"], state["best"], state["ema"]
        self._since_best, self.changes = state.get("since_best", 0), state.get("changes", 0)
        self.gen.set_state(state["gen"])
