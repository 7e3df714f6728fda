"""Local updates (``sync.mode: local``): each worker takes optimizer steps on its own shard and
the replicas are brought together periodically: local SGD, DiLoCo with an outer optimizer,
Streaming DiLoCo with fragments, a delayed exchange and quantization.

The parameters are split into ``sync.fragments`` fragments (one by default), each synced
once every ``sync.sync_steps`` steps at its own offset (:mod:`.fragments`). A sync of a
fragment:

* plain local SGD (no outer optimizer, no quantization, no delay): average its parameters;
* otherwise, with a copy of the fragment's weights at its last sync (its *anchor*): the
  pseudo-gradient ``anchor - params`` is averaged across workers (``sync.quantization``:
  in fp32, bf16 or int8 with one fp32 scale per block, :mod:`.codec`), the anchor takes an
  outer step on it (``outer_optimizer: none`` is ``anchor -= mean``, i.e. averaging;
  ``nesterov`` is DiLoCo's SGD with Nesterov momentum) and the parameters become the new
  anchor. With ``sync.delay = d > 0`` the exchange runs on a background thread while
  training goes on; ``d`` steps later the result is applied, keeping ``sync.overlap_keep``
  of the local progress made meanwhile.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist

from raydrat.config.sync import SyncConfig
from raydrat.core.techniques.sync.codec import exchange_mean
from raydrat.core.techniques.sync.comm import flat_allreduce_mean
from raydrat.core.techniques.sync.fragments import (
    DelayedExchanges,
    Fragment,
    Pending,
    fragment_offset,
    split_fragments,
)
from raydrat.core.techniques.sync.strategy import SyncStrategy


class LocalStrategy(SyncStrategy):
    """Local updates; each fragment (the whole model by default) is synced every
    ``sync_steps`` optimizer steps at its own offset: averaged, or (with an anchor)
    moved by an outer step on the averaged pseudo-gradient; optionally exchanged in
    bf16/int8 and overlapped with ``delay`` steps of compute (see the module docstring)."""

    mode = "local"

    def __init__(self, cfg: SyncConfig, world_size: int):
        super().__init__(cfg, world_size)
        self.fragments: list[Fragment] = []
        self.exchanges = DelayedExchanges()
        self.done = 0
        self.uses_anchor = cfg.outer_optimizer != "none" or cfg.quantization != "none" or cfg.delay > 0

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        # Every replica starts from the same weights (rank 0's), whatever the seeds.
        self._params = list({id(p): p for p in model.parameters()}.values())
        for p in self._params:
            dist.broadcast(p.detach(), src=0)
        self.fragments = split_fragments(model, self.cfg.fragments)
        for frag in self.fragments:
            frag.clean_at = 0
        if self.uses_anchor:
            for frag in self.fragments:
                frag.anchor = frag.flat()
                if self.cfg.outer_optimizer == "nesterov":
                    frag.outer = torch.optim.SGD(
                        [frag.anchor], lr=self.cfg.outer_lr, momentum=self.cfg.outer_momentum, nesterov=True
                    )
        return model

    def offset(self, k: int) -> int:
        """Fragment ``k`` is synced (its result applied) at steps ``done % H == offset(k)``."""
        return fragment_offset(k, self.cfg.sync_steps, self.cfg.fragments)

    def after_optimizer_step(self, done: int) -> bool:
        H, delay = self.cfg.sync_steps, self.cfg.delay
        self.done = done
        synced = False
        for pend in self.exchanges.landing(done):
            self._land(pend)
            synced = True
        for frag in self.fragments:
            if (done + delay) % H == self.offset(frag.index):
                if delay:
                    self._launch(frag, done, due=done + delay)
                else:
                    self._sync_now(frag, done)
                    synced = True
        return synced

    @torch.no_grad()
    def synchronize(self) -> bool:
        """Land the exchanges in flight, then sync every fragment now (a flush: counted in
        ``comm.flush_bytes``, outside the schedule)."""
        for pend in self.exchanges.landing():
            self._land(pend)
        dirty = [f for f in self.fragments if f.clean_at != self.done]
        for frag in dirty:
            self._sync_now(frag, None)
        if dirty and self.cfg.average_optimizer_state and self.optimizer is not None:
            self._average_optimizer_state(flush=True)
        return bool(dirty)

    # -- one fragment --

    @torch.no_grad()
    def _sync_now(self, frag: Fragment, step: int | None) -> None:
        flush = step is None
        if not self.uses_anchor:  # plain local SGD: average the parameters
            flat = frag.flat()
            start = self.comm.launch()
            mean, sent = exchange_mean(flat, "none", self.cfg.quant_block)
            self.comm.add_sent(sent, start, time.perf_counter(), step=step, flush=flush)
            frag.assign(mean)
            frag.clean_at = self.done
        else:
            launched = frag.flat()
            mean = self._exchange(frag.anchor - launched, step, flush)
            self._outer_step(frag, mean, launched, launched)
        if self.cfg.average_optimizer_state and self.optimizer is not None and not flush:
            self._average_optimizer_state(flush=False, step=step)

    def _exchange(self, delta: torch.Tensor, step: int | None, flush: bool) -> torch.Tensor:
        """Mean pseudo-gradient across workers (runs on the background thread with a delay)."""
        start = self.comm.launch()
        mean, sent = exchange_mean(delta, self.cfg.quantization, self.cfg.quant_block)
        self.comm.add_sent(sent, start, time.perf_counter(), step=step, flush=flush)
        return mean

    @torch.no_grad()
    def _launch(self, frag: Fragment, step: int, due: int) -> None:
        launched = frag.flat()
        delta = frag.anchor - launched
        self.exchanges.launch(frag, launched, functools.partial(self._exchange, delta, step, False), due)

    @torch.no_grad()
    def _land(self, pend: Pending) -> None:
        mean = pend.future.result()
        self._outer_step(pend.fragment, mean, pend.launched, pend.fragment.flat())

    def _outer_step(self, frag: Fragment, mean_delta: torch.Tensor, launched: torch.Tensor, now: torch.Tensor) -> None:
        """The anchor moves by the averaged pseudo-gradient (through the outer optimizer);
        the parameters become the new anchor plus ``overlap_keep`` of the progress made
        since the exchange was launched (none without a delay)."""
        if frag.outer is None:
            frag.anchor.sub_(mean_delta)
        else:
            frag.outer_steps += 1
            warm = self.cfg.outer_warmup
            lr = self.cfg.outer_lr * (min(1.0, frag.outer_steps / warm) if warm else 1.0)
            for group in frag.outer.param_groups:
                group["lr"] = lr
            frag.anchor.grad = mean_delta
            frag.outer.step()
            frag.anchor.grad = None
        new = frag.anchor.clone()
        if now is not launched and self.cfg.overlap_keep:
            new.add_(now - launched, alpha=self.cfg.overlap_keep)
        else:
            frag.clean_at = self.done
        frag.assign(new)

    def _average_optimizer_state(self, flush: bool, step: int | None = None) -> None:
        states = [
            v
            for p in self._params
            for v in self.optimizer.state.get(p, {}).values()
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0
        ]
        if states:
            flat_allreduce_mean(states, self.comm, step=step, flush=flush)

    # -- checkpoints --

    def state_dict(self) -> dict:
        out: dict = {}
        if self.uses_anchor:
            out["fragments"] = [
                {
                    "anchor": f.anchor.detach().cpu().clone(),
                    "outer_steps": f.outer_steps,
                    **({"outer": f.outer.state_dict()} if f.outer is not None else {}),
                }
                for f in self.fragments
            ]
        return out

    def load_state_dict(self, state: dict) -> None:
        if not self.uses_anchor:
            return
        saved = state.get("fragments")
        if saved is None and "anchors" in state:  # the one-fragment layout: one anchor per parameter
            saved = [
                {
                    "anchor": torch.cat([a.reshape(-1).float() for a in state["anchors"]]),
                    "outer": state.get("outer"),
                    "outer_steps": 0,
                }
            ]
        if saved is None:
            return
        if len(saved) != len(self.fragments):
            raise ValueError(
                f"the checkpoint holds {len(saved)} sync fragments, this run has "
                f"{len(self.fragments)}: keep sync.fragments as it was"
            )
        with torch.no_grad():
            for frag, s in zip(self.fragments, saved):
                frag.anchor.copy_(s["anchor"].to(frag.anchor.device))
                frag.outer_steps = int(s.get("outer_steps", 0))
                if frag.outer is not None and s.get("outer") is not None:
                    frag.outer.load_state_dict(s["outer"])
