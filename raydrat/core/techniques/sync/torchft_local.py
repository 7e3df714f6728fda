"""Local updates on torchft replica groups (``sync.mode: local`` with ``sync.engine: torchft``).

Each worker is a replica group of one process with its own torchft ``Manager``; the replicas
find each other through a torchft Lighthouse (Ray Train's ``TorchftConfig`` runs it) and
sync with torchft's own ``LocalSGD`` (``outer_optimizer: none``: the parameters are averaged)
or ``DiLoCo`` (``outer_optimizer: nesterov``: an outer SGD with Nesterov momentum on the
averaged pseudo-gradient; with ``fragments`` Streaming DiLoCo, with ``delay`` its overlapped
exchange). Every sync starts with a quorum of the replicas alive at that moment: a dead
replica drops out of the next quorum and the others go on among themselves.

Joining (:meth:`TorchftStrategy.join`, before the first step): a worker takes part in one
sync exactly as the replicas already training take part in their next one. A replica that
is behind (a replacement, started from step 0 or an older checkpoint) is healed in that
quorum from a live peer through torchft's checkpoint transport: the model, the inner
optimizer, the DiLoCo anchors and outer optimizers, the step (``done``) and whatever the
caller shares with :meth:`TorchftStrategy.share_state` (the data position). On a fresh start
every replica joins at step 0 and torchft makes the others equal to the first one.

Between syncs a replica trains alone; ``synchronize`` (before an evaluation or a checkpoint)
does not force a sync outside the schedule, so an evaluation sees this replica's weights
as of its last sync plus its own steps since.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch
from torch import nn
from torch.distributed import ReduceOp

from raydrat.config.sync import SyncConfig
from raydrat.core import metrics as M
from raydrat.core.techniques.base import unwrap
from raydrat.core.techniques.sync.comm import ring_allreduce_bytes
from raydrat.core.techniques.sync.strategy import SyncStrategy

try:  # an optional extra: raydrat[torchft]
    import torchft
    from torchft.checkpointing.pg_transport import PGTransport
    from torchft.coordination import LighthouseServer
    from torchft.local_sgd import DiLoCo, LocalSGD
except ImportError:  # pragma: no cover - depends on the environment
    torchft = None

TORCHFT_MISSING = "sync.engine=torchft needs the torchft package: pip install 'raydrat[torchft]'"
PROGRESS_KEY = "raydrat"
"""The key of the loop's own progress (step, model, inner optimizer) in torchft's state."""

COLLECTIVE_TIMEOUT = timedelta(seconds=60)
"""One all-reduce or checkpoint transfer, and the process group's re-forming after a death."""
QUORUM_TIMEOUT = timedelta(seconds=600)
"""How long a replica waits in a quorum for the others: a replacement waits there until the
replicas alive reach their next sync (up to ``sync_steps`` steps, plus their checkpoint)."""


class QuorumMembers:
    """torchft's manager client, passed through, noting each quorum's members: the replica
    processes' ids (torchft's ``replica_id:uuid``, new for every process, so a replacement
    is a new member even under its predecessor's name) in rank order, and this replica's.
    torchft's ``Manager`` keeps the quorum's sizes, not its members, and a dead replica
    replaced within one sync interval leaves the size as it was."""

    def __init__(self, client):
        self._client = client
        self.members: list[str] = []
        self.me: str | None = None

    def _quorum(self, *args, **kwargs):
        quorum = self._client._quorum(*args, **kwargs)
        self.members = list(quorum.replica_ids)
        self.me = self.members[quorum.replica_rank]
        return quorum

    def __getattr__(self, name: str):
        return getattr(self._client, name)


def torchft_available() -> bool:
    return torchft is not None


def start_lighthouse(**kwargs) -> LighthouseServer:
    """A torchft Lighthouse in this process, on a free port (``kwargs``: its quorum rules,
    e.g. ``min_replicas``); ``.address()`` is what replicas connect to."""
    if torchft is None:
        raise ImportError(TORCHFT_MISSING)
    return LighthouseServer(bind="[::]:0", **kwargs)


def model_fragments(model: nn.Module, n_fragments: int) -> list[nn.Module]:
    """The modules torchft's DiLoCo syncs one at a time: block ``i`` in fragment
    ``i % n_fragments`` (strided, like raydrat's own fragments), every parameter outside the
    blocks (embedding, final norm, head) in fragment 0 (torchft syncs whole modules; raydrat's
    own fragments cut those into row chunks). Tied parameters count once."""
    bare = unwrap(model)
    if n_fragments == 1:
        return [bare]
    layers = bare.layers
    frags = [nn.ModuleList() for _ in range(n_fragments)]
    for key, block in layers.items():
        frags[int(key) % n_fragments].append(block)
    in_blocks = {id(p) for p in layers.parameters()}
    outside = nn.ParameterList()
    seen: set[int] = set()
    for p in bare.parameters():
        if id(p) not in in_blocks and id(p) not in seen:
            seen.add(id(p))
            outside.append(p)
    frags[0].append(outside)
    return frags


class TorchftStrategy(SyncStrategy):
    """Local updates through torchft (see the module docstring). Built by
    :func:`~raydrat.core.techniques.sync.build.build_strategy`; the adapter that knows the
    replica's index and the Lighthouse calls :meth:`connect` and then :meth:`join`."""

    mode = "local"
    hands_over_logging = True

    def __init__(self, cfg: SyncConfig, world_size: int):
        if torchft is None:
            raise ImportError(TORCHFT_MISSING)
        super().__init__(cfg, world_size)
        self.manager = None
        self.impl: LocalSGD | DiLoCo | None = None
        self.done = 0
        """The loop's step as of this replica's last sync (what a healed replica takes on)."""
        self.healed_at: int | None = None
        """The step this replica took on from a peer when it joined (``None``: it was not behind)."""
        self.quorum_size = 0
        self.commits = 0
        self.failed_commits = 0
        self._left = 0
        self._joined = 0
        self.changed_at: int | None = None
        """The step of the last sync whose quorum differed from the one before."""
        self._members: list[str] | None = None
        """The last quorum's members (:class:`QuorumMembers`), ``None`` before the first."""
        self._first_staying = False
        """Whether it is the first of the last quorum's members that were in the one before."""
        self._saved: dict | None = None
        self._shared: list[tuple[str, Callable[[object], None], Callable[[], object]]] = []
        self._agreements: list[tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]] = []
        self._outer: list[torch.optim.Optimizer] = []
        self._fragments: list[nn.Module] = []

    def apply(self, model: nn.Module) -> nn.Module:
        self.model = model
        self._fragments = model_fragments(model, self.cfg.fragments)
        return model

    def share_state(self, key: str, load: Callable[[object], None], save: Callable[[], object]) -> None:
        """Hand ``save()``'s value to a replica healed from this one (it gets ``load(value)``);
        before :meth:`connect`."""
        self._shared.append((key, load, save))

    def agree_on(self, encode: Callable[[], torch.Tensor], record: Callable[[torch.Tensor], None]) -> None:
        """After every sync, sum ``encode()`` (an integer tensor) across the quorum and hand
        the sum to ``record`` (what the replicas agreed on at that sync: the data cursors)."""
        self._agreements.append((encode, record))

    # -- connecting --

    def connect(
        self,
        replica: int,
        lighthouse: str | None = None,
        device: torch.device | None = None,
        store: tuple[str, int] | None = None,
        host: str | None = None,
    ) -> None:
        """Start this replica group's ``Manager`` (replica ``replica`` of ``world_size``; the
        Lighthouse at ``lighthouse``, else ``$TORCHFT_LIGHTHOUSE``; the group's own TCP store
        at ``store``, else ``$MASTER_ADDR:$MASTER_PORT``; the others reach this replica's
        manager at ``host``, else at this machine's host name) and torchft's ``LocalSGD`` or
        ``DiLoCo`` over it."""
        device = device or torch.device("cpu")
        pg = (
            torchft.ProcessGroupNCCL(timeout=COLLECTIVE_TIMEOUT)
            if device.type == "cuda"
            else torchft.ProcessGroupGloo(timeout=COLLECTIVE_TIMEOUT)
        )
        self.manager = torchft.Manager(
            pg=pg,
            min_replica_size=1,
            load_state_dict=None,
            state_dict=None,
            use_async_quorum=False,  # DiLoCo's requirement; a healed replica is whole before it steps
            timeout=COLLECTIVE_TIMEOUT,
            quorum_timeout=QUORUM_TIMEOUT,
            rank=0,
            world_size=1,
            lighthouse_addr=lighthouse,
            store_addr=store[0] if store else None,
            store_port=store[1] if store else None,
            replica_id=f"raydrat_{replica}",
            hostname=host or socket.gethostname(),
            checkpoint_transport=PGTransport(pg, timeout=COLLECTIVE_TIMEOUT, device=device),
        )
        self._quorums = self.manager._client = QuorumMembers(self.manager._client)
        self.manager.register_state_dict_fn(PROGRESS_KEY, self._load_progress, self._progress)
        for key, load, save in self._shared:
            self.manager.register_state_dict_fn(key, load, save)
        self.impl = self._build_impl()
        if self._saved is not None:
            self._apply_saved(self._saved)
            self._saved = None

    def _build_impl(self) -> LocalSGD | DiLoCo:
        cfg = self.cfg
        if cfg.outer_optimizer == "none":
            return LocalSGD(self.manager, self.model, self.optimizer, sync_every=cfg.sync_steps)
        self._outer = [
            torch.optim.SGD(frag.parameters(), lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=True)
            for frag in self._fragments
        ]
        return DiLoCo(
            self.manager,
            self._fragments,
            self.optimizer,
            self._outer,
            sync_every=cfg.sync_steps,
            fragment_sync_delay=cfg.delay,
            fragment_update_alpha=0.0,
        )

    def join(self) -> bool:
        """Take part in one sync now, at the point in the schedule where the replicas already
        training are due for their next one (a quorum, then the exchange, then the commit).
        Returns whether this replica was behind and healed from a peer: it then takes on
        the peer's step (:attr:`done`) and shared state."""
        before = self.done
        self.healed_at = None
        self.impl._local_step = self._steps_per_sync() - self.cfg.delay - 1
        self._hook()
        if self.done != before:
            self.healed_at = self.done
        return self.healed_at is not None

    # -- the step protocol --

    def after_optimizer_step(self, done: int) -> bool:
        self.done = done
        return self._hook()

    def _steps_per_sync(self) -> int:
        """Steps between two syncs of torchft's schedule (of one fragment in DiLoCo)."""
        return self.cfg.sync_steps // (self.cfg.fragments if isinstance(self.impl, DiLoCo) else 1)

    def _hook(self) -> bool:
        """torchft's own post-step hook (it syncs when due); True if a sync committed."""
        step_before, local = self.manager.current_step(), self.impl._local_step + 1
        syncing = local == self._steps_per_sync()
        quorum = local in (self._steps_per_sync(), self._steps_per_sync() - self.cfg.delay)
        start = self.comm.launch() if syncing else 0.0
        self.impl._step_post_hook(self.optimizer, (), {})
        if quorum:
            self._observe_quorum()
        if not syncing:
            return False
        committed = self.manager.current_step() != step_before
        for encode, record in self._agreements:
            summed = encode()
            self.manager.allreduce(summed, reduce_op=ReduceOp.SUM).wait()
            record(summed)
        self.commits += committed
        self.failed_commits += not committed
        payload = self._sync_payload_bytes()
        sent = ring_allreduce_bytes(payload, max(1, self.quorum_size))
        self.comm.add_sent(sent, start, time.perf_counter(), step=self.done)
        return committed

    def _sync_payload_bytes(self) -> int:
        """The bytes torchft all-reduces in one sync: every parameter (LocalSGD), or one
        fragment's pseudo-gradients (DiLoCo), in their own dtype."""
        if isinstance(self.impl, DiLoCo):
            frag = self._fragments[(self.manager.current_step() - 1) % len(self._fragments)]
            params = list(frag.parameters())
        else:
            params = list(self.model.parameters())
        return sum(p.numel() * p.element_size() for p in params)

    def _observe_quorum(self) -> None:
        members, before = self._quorums.members, self._members
        if before is not None:
            self._left += len(set(before) - set(members))
            self._joined += len(set(members) - set(before))
        if members != before:
            self.changed_at = self.done
        staying = [m for m in members if before is None or m in before]
        self._first_staying = bool(staying) and staying[0] == self._quorums.me
        self._members = members
        self.quorum_size = self.manager.num_participants()

    def logs_for_the_group(self, rank: int) -> bool:
        """The first replica of the last quorum: while rank 0 is away (dead, or its
        replacement not healed yet) the lowest live replica records the metrics, from the
        sync that found it gone. The step of a sync whose quorum changed is recorded by the
        first of the members that stay: a replica that joins there (and may be the new
        first) trains only the steps after it, so that step (with ``replicas/left`` and
        ``replicas/joined``) would otherwise go unrecorded."""
        if self.manager is None or self._members is None:
            return rank == 0
        if self.changed_at == self.done:
            return self._first_staying
        return bool(self._members) and self._members[0] == self._quorums.me

    def all_present(self) -> bool:
        """Whether every replica took part in the last sync, and the same ones as in the sync
        before (a replica that joined at the last sync starts after it: it does not take
        part in what the others do at that step)."""
        return self.quorum_size == self.world_size and self.changed_at != self.done

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out[M.QUORUM_SIZE] = float(self.quorum_size)
        out[M.REPLICAS_LEFT] = float(self._left)
        out[M.REPLICAS_JOINED] = float(self._joined)
        out[M.SYNC_COMMITS_FAILED] = float(self.failed_commits)
        self._left = self._joined = 0
        return out

    def close(self) -> None:
        """Leave the quorum (the others go on without this replica)."""
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = None

    # -- what a healed replica receives --

    def _progress(self) -> dict:
        return {
            "done": self.done,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _load_progress(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.done = int(state["done"])

    # -- checkpoints (a restart of every replica) --

    def state_dict(self) -> dict:
        if self.manager is None:
            return self._saved or {}
        frags = []
        for frag in getattr(self.impl, "_fragments", []):
            frags.append(
                {
                    "outer": frag._outer_optimizer.state_dict(),
                    "anchor": {k: v.detach().cpu().clone() for k, v in frag.original_parameters.items()},
                }
            )
        return {"torchft": {"manager": self.manager.state_dict(), "fragments": frags, "done": self.done}}

    def load_state_dict(self, state: dict) -> None:
        if "torchft" not in state:
            return
        if self.manager is None:
            self._saved = state
        else:
            self._apply_saved(state)

    def _apply_saved(self, state: dict) -> None:
        saved = state["torchft"]
        self.manager.load_state_dict(saved["manager"])
        self.done = int(saved["done"])
        frags = getattr(self.impl, "_fragments", [])
        if len(saved["fragments"]) != len(frags):
            raise ValueError(
                f"the checkpoint holds {len(saved['fragments'])} torchft sync fragments, this run has "
                f"{len(frags)}: keep sync.fragments and sync.outer_optimizer as they were"
            )
        with torch.no_grad():
            for frag, s in zip(frags, saved["fragments"]):
                frag._outer_optimizer.load_state_dict(s["outer"])
                for name, t in s["anchor"].items():
                    frag.original_parameters[name].copy_(t)
