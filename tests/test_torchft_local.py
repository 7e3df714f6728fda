"""torchft's LocalSGD / DiLoCo behind raydrat's sync strategy (sync.engine: torchft), without
Ray: replica processes meet at a Lighthouse in the test process; one is killed between two
syncs and a new process takes its place. The survivor keeps stepping (its quorum shrinks to
itself), never repeats a step, and the replacement, healed from it, holds exactly the
survivor's weights after the sync it joins at, and its step. The survivor logs the group's
metrics while the logging replica (replica 0) is away, and only then."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch
from torch import nn

from raydrat.bench.loopback import free_port
from raydrat.config.sync import SyncConfig
from raydrat.core.techniques.sync.strategy import model_checksum
from raydrat.core.techniques.sync.torchft_local import TorchftStrategy, model_fragments, start_lighthouse

pytestmark = pytest.mark.slow

STEPS, H, DIES_AFTER, PACE_S = 48, 4, 9, 0.5
"""The survivor sleeps PACE_S after each step: a new process takes seconds to start here."""


class Tiny(nn.Module):
    """Blocks in a ``layers`` ModuleDict, as the GPT has (for fragments)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.layers = nn.ModuleDict({str(i): nn.Linear(8, 8) for i in range(2)})
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        x = self.emb(x)
        for block in self.layers.values():
            x = torch.tanh(block(x))
        return self.head(x)


def _replica(index: int, lighthouse: str, sync: dict, dies_after: int | None, out) -> None:
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    torch.manual_seed(index)  # different initial weights: the first quorum makes them one
    model = Tiny()
    strategy = TorchftStrategy(SyncConfig(mode="local", engine="torchft", sync_steps=H, **sync), 2)
    strategy.apply(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    strategy.attach_optimizer(optimizer)
    strategy.connect(index, lighthouse, store=("127.0.0.1", port))
    healed = strategy.join()
    out.put((index, os.getpid(), "start", strategy.done, model_checksum(model), healed))
    g = torch.Generator().manual_seed(100 + index)
    for step in range(strategy.done, STEPS):
        loss = model(torch.randn(16, 4, generator=g)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synced = strategy.after_optimizer_step(step + 1)
        logs = strategy.logs_for_the_group(index)
        out.put((index, os.getpid(), "step", step + 1, model_checksum(model), synced, logs))
        if step + 1 == dies_after:
            os._exit(1)
        time.sleep(PACE_S)
    strategy.close()
    del store


def test_model_fragments_cover_every_parameter_once():
    model = Tiny()
    frags = model_fragments(model, 2)
    ids = [id(p) for f in frags for p in f.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in frags[1].parameters()} == {id(p) for p in model.layers["1"].parameters()}


@pytest.mark.parametrize(
    "sync", [{}, {"outer_optimizer": "nesterov"}, {"outer_optimizer": "nesterov", "fragments": 2}], ids=str
)
def test_a_killed_replica_is_replaced_and_rejoins_with_the_survivors_weights(sync):
    lighthouse = start_lighthouse(min_replicas=1, join_timeout_ms=5000, heartbeat_timeout_ms=2000)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    # replica 0 dies (the one that logs the group's metrics while it is there), replica 1 survives
    survivor = ctx.Process(target=_replica, args=(1, lighthouse.address(), sync, None, out))
    dying = ctx.Process(target=_replica, args=(0, lighthouse.address(), sync, DIES_AFTER, out))
    survivor.start()
    dying.start()
    dying.join(timeout=300)
    replacement = ctx.Process(target=_replica, args=(0, lighthouse.address(), sync, None, out))
    replacement.start()
    survivor.join(timeout=300)
    replacement.join(timeout=300)
    lighthouse.shutdown()
    events = []
    while not out.empty():
        events.append(out.get())
    assert survivor.exitcode == 0 and replacement.exitcode == 0

    mine = [e for e in events if e[0] == 1 and e[2] == "step"]
    # a survivor that reached the first quorum after the other replica stepped is healed to its
    # step and starts there (the processes start seconds apart here); from then on, every step
    # once, in order, to the end
    first = next(e for e in events if e[1] == survivor.pid and e[2] == "start")[3]
    assert [e[3] for e in mine] == list(range(first + 1, STEPS + 1)) and first < DIES_AFTER
    joined = next(e for e in events if e[1] == replacement.pid and e[2] == "start")
    at = joined[3]
    assert joined[5] and DIES_AFTER < at <= STEPS  # healed from the survivor, at a later step
    survivor_at = next(e for e in mine if e[3] == at)
    assert joined[4] == survivor_at[4]  # exactly the survivor's weights after that sync

    # who logs the group's metrics: replica 0 while it is in the quorum; the survivor (replica
    # 1) while it is alone: from a sync after replica 0 died until the replacement takes part
    # in a sync (it heals at `at`, and is a participant from the next quorum on), and before
    # replica 0 first joined it (they start seconds apart)
    logged = [e[3] for e in mine if e[6]]
    assert not {DIES_AFTER - 1, DIES_AFTER} & set(logged), logged  # both in the quorum of step 8
    alone = [s for s in logged if s > DIES_AFTER]
    assert alone and all(s <= at + H for s in alone), (logged, at)
    theirs = [e for e in events if e[1] == replacement.pid and e[2] == "step"]
    assert not mine[-1][6] and theirs[-1][6] and theirs[-1][3] == STEPS
