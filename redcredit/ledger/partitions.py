"""Which syncer reads which journal partition.

Each partition is read by one syncer at a time, so an account's entries reach
PostgreSQL in the order they were journaled, and none waits behind an earlier
entry in another syncer's batch. Syncers announce themselves in a set
(``lua/sync_members.lua``); each takes the partitions whose number, modulo the
number of live syncers, is its rank by name, under a lease
(``lua/sync_lease.lua``) that lapses when it stops renewing it. A syncer that
joins or leaves moves partitions within a renewal period; those of a dead one
are free after ``sync_claim_idle``.

The members set is one key, on one node; each lease is a key of its
partition's slot, on the node that owns the partition, so on a Redis Cluster
the leases of one renewal go as one pipeline per node.

Leases keep the work apart; they are not what keeps it correct. Two syncers
that both read a partition (one paused past its lease) still write nothing
twice and leave no hole (:func:`~redcredit.backends.postgres.apply_entries`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from ..backends.pipelines import run_scripts
from ..backends.topology import Topology
from ..core.journal import text
from ..core.keys import KeySpace
from ..core.scripts import load_scripts

__all__ = ["LeaseChange", "PartitionLeases", "share_of"]


def share_of(members: Sequence[str], me: str, partitions: int) -> frozenset[int]:
    """The partitions ``me`` should read while ``members`` are the live syncers."""
    ranked = sorted(set(members))
    if me not in ranked:
        return frozenset()
    return frozenset(range(ranked.index(me), partitions, len(ranked)))


@dataclass(frozen=True, slots=True)
class LeaseChange:
    gained: frozenset[int]  # taken over: pending entries of the previous reader are ours now
    lost: frozenset[int]  # another syncer reads them now


class PartitionLeases:
    """One syncer's leases on its share of the partitions."""

    def __init__(
        self, topology: Topology, keys: KeySpace, group: str, name: str, lease: timedelta
    ) -> None:
        self._topology = topology
        self._keys = keys
        self._group = group
        self._name = name
        self._lease_ms = max(int(lease.total_seconds() * 1000), 1)
        scripts = load_scripts()
        self._lease_script = scripts["sync_lease"]
        self._members_script = scripts["sync_members"]
        self.held: frozenset[int] = frozenset()

    def renew(self) -> LeaseChange:
        """Stays a member, gives up what is no longer its share, takes or renews the rest."""
        members = self._members(leaving=False)
        target = share_of(members, self._name, self._keys.partitions)
        wanted = sorted(target)
        calls = [(p, "hold") for p in wanted] + [(p, "release") for p in self.held - target]
        replies = self._leases(calls)
        held = frozenset(p for p, ours in zip(wanted, replies, strict=False) if ours == 1)
        change = LeaseChange(held - self.held, self.held - held)
        self.held = held
        return change

    def release_all(self) -> None:
        """Leaves at once, so the others take the partitions over without waiting."""
        self._leases([(p, "release") for p in self.held])
        self.held = frozenset()
        self._members(leaving=True)

    def _members(self, *, leaving: bool) -> list[str]:
        key = self._keys.sync_members(self._group)
        args: list[str | int] = [self._name, self._lease_ms, "1" if leaving else "0"]
        (names,) = run_scripts(self._topology, self._members_script, [([key], args)])
        return [text(name) for name in names]

    def _leases(self, calls: Sequence[tuple[int, str]]) -> list[int]:
        """Holds or releases each (partition, mode), in one round trip."""
        script_calls: list[tuple[Sequence[str], Sequence[str | int]]] = [
            ([self._keys.sync_lease(p, self._group)], [self._name, self._lease_ms, mode])
            for p, mode in calls
        ]
        return [
            int(reply) for reply in run_scripts(self._topology, self._lease_script, script_calls)
        ]
