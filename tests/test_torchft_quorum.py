"""Under sync.engine: torchft, who records the group's metrics and what ``replicas/left`` and
``replicas/joined`` say, from the members of each quorum (no processes: the members are set
by hand as :class:`QuorumMembers` notes them from torchft's quorum; the live replicas are in
``test_torchft_local.py`` and ``test_replicas.py``)."""

from __future__ import annotations

import pytest

from raydrat.config.sync import SyncConfig
from raydrat.core.techniques.sync.torchft_local import TorchftStrategy, torchft_available

pytestmark = pytest.mark.skipif(not torchft_available(), reason="needs torchft (raydrat[torchft])")


class _Noted:
    """What :class:`QuorumMembers` holds after a quorum."""

    def __init__(self, me: str):
        self.me, self.members = me, []

    def num_participants(self) -> int:  # the manager's figure, as torchft's sync quorum gives it
        return len(self.members)


def test_who_logs_and_who_left_or_joined_follow_the_quorums_members():
    """As seen by replica ``b``: the first replica of each quorum logs the steps after it; the
    step of a quorum that changed is logged by the first member that stayed; a replacement
    under its predecessor's name (a new process id) counts as one left and one joined,
    though the quorum's size is the same."""
    strategy = TorchftStrategy(SyncConfig(mode="local", engine="torchft", sync_steps=4), 2)
    noted = _Noted(me="raydrat_1:b")
    strategy._quorums = strategy.manager = noted
    seen = []
    for step, members in (
        (4, ["raydrat_0:a", "raydrat_1:b"]),  # both start: a is first
        (8, ["raydrat_0:a", "raydrat_1:b"]),  # nothing changed
        (12, ["raydrat_1:b"]),  # a died: b logs from this step on
        (16, ["raydrat_1:b"]),
        (20, ["raydrat_0:c", "raydrat_1:b"]),  # a's replacement c, first by name: b logs step 20, c after
        (24, ["raydrat_0:d", "raydrat_1:b"]),  # c died and d took its place within one interval
    ):
        noted.members = members
        strategy.done = step
        strategy._observe_quorum()
        figures = strategy.metrics()
        at_sync, present = strategy.logs_for_the_group(1), strategy.all_present()
        strategy.done = step + 1
        after = strategy.logs_for_the_group(1)
        seen.append((step, at_sync, after, figures["replicas/left"], figures["replicas/joined"], present))
    # (step, logs it, logs the steps after, left, joined, every replica in the same sync as before)
    assert seen == [
        (4, False, False, 0.0, 0.0, False),
        (8, False, False, 0.0, 0.0, True),
        (12, True, True, 1.0, 0.0, False),
        (16, True, True, 0.0, 0.0, False),
        (20, True, False, 0.0, 1.0, False),
        (24, True, False, 1.0, 1.0, False),  # no checkpoint report here: d would not reach it
    ]
    assert strategy.quorum_size == 2 and strategy.changed_at == 24


def test_before_its_first_quorum_rank_0_logs():
    strategy = TorchftStrategy(SyncConfig(mode="local", engine="torchft", sync_steps=4), 2)
    assert strategy.logs_for_the_group(0) and not strategy.logs_for_the_group(1)
