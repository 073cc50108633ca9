"""How far PostgreSQL is behind Redis: the journal not yet persisted, over every node."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.client import Pipeline

from ..backends.pipelines import Command, as_error, run_commands
from ..backends.slots import Address
from ..backends.topology import Topology
from ..core.journal import text

__all__ = ["SyncLag", "read_lag"]


@dataclass(frozen=True, slots=True)
class SyncLag:
    """How far PostgreSQL is behind Redis."""

    entries: int  # journal entries not yet persisted (waiting or in flight)
    pending: int  # delivered to a syncer, not yet acknowledged
    oldest_age_ms: int | None  # age of the oldest entry not yet persisted

    @property
    def caught_up(self) -> bool:
        return self.entries == 0


def read_lag(topology: Topology, streams: Sequence[str], group: str) -> SyncLag:
    """Summed over the nodes; an entry's age by the clock (TIME) of the node that holds it."""
    commands: list[Command] = []
    for stream in streams:
        commands += [
            Command.of(stream, Pipeline.xlen, stream),
            Command.of(stream, Pipeline.xrange, stream, count=1),
            Command.of(stream, Pipeline.xpending, stream, group),
        ]
    done = run_commands(topology, commands, tail=lambda _node, pipe: pipe.time())
    now_ms: dict[Address, int] = {}
    for node, (clock,) in done.tails:
        if isinstance(clock, Exception):
            raise as_error(clock)
        seconds, micros = clock
        now_ms[node] = int(seconds) * 1000 + int(micros) // 1000
    entries = pending = 0
    oldest: int | None = None
    for i in range(len(streams)):
        length, first, summary = done.replies[3 * i : 3 * i + 3]
        for reply in (length, first):
            if isinstance(reply, Exception):
                raise as_error(reply)
        entries += int(length)
        # No group yet (nothing synced so far): nothing in flight.
        if isinstance(summary, dict):
            pending += int(summary.get("pending", 0))
        if first:
            age = now_ms[done.nodes[3 * i]] - int(text(first[0][0]).split("-")[0])
            oldest = age if oldest is None else max(oldest, age)
    return SyncLag(entries, pending, None if oldest is None else max(oldest, 0))
