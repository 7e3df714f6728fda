"""Time spent in the transformer layer stack, separately from the rest of a step.

:class:`LayerStackTimer` hooks a :class:`~raydrat.core.model.transformer.GPT` from outside
(forward hooks on its blocks, gradient hooks on the stack's input and the blocks' outputs)
and accumulates, per training step:

* forward: from the first active block's start to the last active block's end;
* backward: from the moment the gradient of the last block's output is complete (the head
  and loss backward are done) to the moment the gradient of the first block's input is
  complete (every block's backward, recomputation of checkpointed branches included, is
  done; the embedding backward comes after).

Everything else (embedding, final norm, LM head, loss, optimizer step) is "outside the
layers". With the layer time ``t``, the stack's throughput is ``tokens / t``: the figure
the layer-dropping target ("tokens/s through the transformer layers") is about. On CUDA
each mark synchronises the device, which is right for measuring and wrong for production.
Not usable under ``torch.compile`` (hooks in a compiled region break the graph).
"""

from __future__ import annotations

import time

import torch


class LayerStackTimer:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.enabled = False
        self.forward_s = 0.0
        self.backward_s = 0.0
        self._fwd_start: float | None = None
        self._fwd_end = 0.0
        self._bwd_start: float | None = None
        self._handles = [model.register_forward_pre_hook(self._new_forward)]
        for block in model.layers.values():
            self._handles += [
                block.register_forward_pre_hook(self._block_start),
                block.register_forward_hook(self._block_end),
            ]

    @staticmethod
    def _now(t: torch.Tensor) -> float:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
        return time.perf_counter()

    def _active(self) -> bool:
        return self.enabled and torch.is_grad_enabled()

    def _new_forward(self, _module, _args) -> None:
        self._fwd_start, self._bwd_start = None, None

    def _block_start(self, _module, args) -> None:
        x = args[0]
        if not self._active() or self._fwd_start is not None or not x.requires_grad:
            return
        self._fwd_start = self._now(x)
        x.register_hook(self._stack_input_grad)

    def _block_end(self, _module, _args, out) -> None:
        if not self._active() or self._fwd_start is None:
            return
        self._fwd_end = self._now(out)
        out.register_hook(self._block_output_grad)

    def _block_output_grad(self, grad: torch.Tensor) -> None:
        if self._bwd_start is None:  # the first one complete is the last block's output
            self._bwd_start = self._now(grad)

    def _stack_input_grad(self, grad: torch.Tensor) -> None:
        if self._fwd_start is None or self._bwd_start is None:
            return
        self.backward_s += self._now(grad) - self._bwd_start
        self.forward_s += self._fwd_end - self._fwd_start
        self._fwd_start = self._bwd_start = None

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    def reset(self) -> None:
        self.forward_s = self.backward_s = 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
