"""What a batch waits for before PostgreSQL may commit it: its node's replicas and disk.

PostgreSQL must never hold a journal entry that Redis can forget: a replica
promoted in a failover, or a Redis restarted from its append-only file, would
then lack it, and the account would reuse its sequence number for another
change. So before a batch is committed, after a write on each node that holds
its streams (the syncer claims the entries again), the same connection asks
for ``WAIT <replicas>`` and ``WAITAOF 1 0``: both wait for the writes that
connection made, and so for the entries before them. A node with no replica
has nothing to wait for, nor has one without an append-only file.

Which replicas count: on a Redis Cluster, every replica the node lists as
its own and does not yet suspect (not ``fail?`` nor ``fail``), connected or
not. A replica whose link just dropped (paused, partitioned) still stands
for election, so a batch waits for it until it returns or the cluster gives
up on it (the node timeout); counting only the connected ones would commit,
in that window, entries a promoted replica lacks. On one server, the
connected replicas.
"""

from __future__ import annotations

import re
from typing import Any, Final

from redis.client import Pipeline
from redis.exceptions import ResponseError

from ..backends.pipelines import as_error, slot_map
from ..backends.redis import redis_errors_translated, translated
from ..backends.slots import Address, SlotMap
from ..backends.topology import Topology
from ..config import Settings
from ..core.journal import text
from ..errors import RedCreditError

__all__ = ["Confirmations"]

_WAITAOF_TIMEOUT_MS: Final = (
    1_500  # above appendfsync everysec's one second, below the socket timeout
)
# A replica acknowledges within a round trip; one that takes longer is lagging
# or gone, and the batch waits for the next try.
_WAIT_TIMEOUT_MS: Final = 1_000
_NO_AOF: Final = re.compile(r"appendonly is disabled|unknown command", re.IGNORECASE)
_SUSPECTED: Final = frozenset({"fail?", "fail", "noaddr", "handshake"})


class Confirmations:
    """The waits of one syncer, and how many replicas each primary has (INFO replication)."""

    def __init__(self, settings: Settings, topology: Topology) -> None:
        self._replicas_wanted = settings.sync_waits_for_replicas
        self._disk_wanted = settings.sync_waits_for_aof
        self._topology = topology
        # Read again after the map changed, after a wait fell short, and
        # whenever the syncer renews its leases (forget).
        self._replicas: dict[Address, int] = {}
        self._read_with: SlotMap | None = None
        self._asked: dict[Address, int] = {}

    @property
    def wanted(self) -> bool:
        return self._replicas_wanted or self._disk_wanted

    def forget(self) -> None:
        """The replica counts are read again: one may have joined or left."""
        self._replicas.clear()

    def add(self, node: Address, pipe: Pipeline) -> None:
        """Puts the waits on ``node``'s pipeline, after its writes."""
        replicas = self._replicas_of(node) if self._replicas_wanted else 0
        self._asked[node] = replicas
        if replicas:
            pipe.execute_command("WAIT", replicas, _WAIT_TIMEOUT_MS)  # type: ignore[no-untyped-call]
        if self._disk_wanted:
            pipe.execute_command("WAITAOF", 1, 0, _WAITAOF_TIMEOUT_MS)  # type: ignore[no-untyped-call]

    def check(self, tails: list[tuple[Address, list[Any]]]) -> None:
        """Raises unless every node's waits were met; the batch is then not committed."""
        for node, replies in tails:
            self._check(node, self._asked[node], replies)

    def _check(self, node: Address, replicas: int, replies: list[Any]) -> None:
        where = f"{node[0]}:{node[1]}"
        if replicas:
            acknowledged = replies[0]
            if isinstance(acknowledged, Exception):
                raise as_error(acknowledged)
            if int(acknowledged) < replicas:
                # A replica gone for good is seen at the next read; one that
                # lags holds the batch back until it catches up.
                self._replicas.pop(node, None)
                raise RedCreditError(
                    f"{acknowledged} of the {replicas} replicas of {where} confirmed the "
                    "batch's journal entries in time; not committed, will retry"
                )
        if not self._disk_wanted:
            return
        on_disk = replies[-1]
        if isinstance(on_disk, ResponseError):
            # Without an append-only file (or on a server without WAITAOF)
            # there is nothing to wait for: a restart loses everything.
            if not _NO_AOF.search(str(on_disk)):
                raise translated(on_disk)
        elif isinstance(on_disk, Exception):
            raise as_error(on_disk)
        elif int(on_disk[0]) < 1:
            raise RedCreditError(
                f"the journal entries were not yet on disk in Redis at {where}; will retry"
            )

    def _replicas_of(self, node: Address) -> int:
        current = slot_map(self._topology)
        if current is not self._read_with:
            # A failover or a reshard: replicas may have come, gone or been promoted.
            self._replicas.clear()
            self._read_with = current
        replicas = self._replicas.get(node)
        if replicas is None:
            client = self._topology.client(node)
            with redis_errors_translated():
                info = client.info("replication")
                replicas = int(info.get("connected_slaves", 0))
                if self._topology.is_cluster:
                    listed = client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
                    replicas = max(replicas, _unsuspected_replicas(listed))
            self._replicas[node] = replicas
        return replicas


def _unsuspected_replicas(nodes: bytes | str) -> int:
    """How many replicas of the node that answered CLUSTER NODES it does not suspect."""
    lines = [line.split() for line in text(nodes).splitlines()]
    me = next((fields[0] for fields in lines if len(fields) > 3 and "myself" in fields[2]), None)
    return sum(
        1
        for fields in lines
        if len(fields) > 3 and fields[3] == me and not set(fields[2].split(",")) & _SUSPECTED
    )
