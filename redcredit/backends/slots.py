"""Which node owns which key: the slot map of a Redis Cluster, or one node for every key.

Pure data and pure decisions, shared by the synchronous and asyncio routers
(:mod:`.topology`): what to do with each reply a node gives a script call.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    TryAgainError,
)

__all__ = [
    "FIRST_PAUSE_S",
    "LONGEST_PAUSE_S",
    "SLOTS",
    "Address",
    "Next",
    "Route",
    "SlotMap",
    "next_step",
    "slot_of",
]

SLOTS: Final = 16384
# A slot moved by a reshard is followed at once; a loop of redirects is a bug.
_MAX_REDIRECTS: Final = 16
# Refusals that ran nothing are tried again after a pause growing between these.
FIRST_PAUSE_S: Final = 0.01
LONGEST_PAUSE_S: Final = 0.2
# A full re-read of the map after a MOVED, at most this often: a reshard sends
# many at once.
_REREAD_EVERY_S: Final = 0.1
Address = tuple[str, int]


@lru_cache(maxsize=65536)
def slot_of(key: str) -> int:
    # Every key of a call shares its partition's hash tag, so the first decides.
    return int(key_slot(key.encode()))


@dataclass(slots=True)
class SlotMap:
    """The primary owning each slot, and the replicas of each primary."""

    owners: list[Address]
    replicas: dict[Address, tuple[Address, ...]] = field(default_factory=dict)

    @classmethod
    def single(cls, address: Address) -> SlotMap:
        return cls([address] * SLOTS)

    @classmethod
    def from_cluster_slots(cls, reply: Sequence[Any], fallback_host: str) -> SlotMap:
        """From the raw reply of CLUSTER SLOTS; a node announcing no host is ``fallback_host``."""
        owners: list[Address | None] = [None] * SLOTS
        replicas: dict[Address, tuple[Address, ...]] = {}
        for start, end, primary, *others in reply:
            owner = _address(primary, fallback_host)
            owners[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
            replicas[owner] = tuple(_address(node, fallback_host) for node in others)
        missing = owners.count(None)
        if missing:
            raise ValueError(f"{missing} of {SLOTS} slots have no primary")
        return cls([owner for owner in owners if owner is not None], replicas)

    def owner(self, slot: int) -> Address:
        return self.owners[slot]

    def moved(self, slot: int, address: Address) -> None:
        self.owners[slot] = address

    @property
    def primaries(self) -> list[Address]:
        return sorted(set(self.owners))

    def group(self, keys: Iterable[str]) -> Mapping[Address, list[str]]:
        """``keys`` by the primary that owns them, each group in the order given."""
        groups: dict[Address, list[str]] = {}
        for key in keys:
            groups.setdefault(self.owners[slot_of(key)], []).append(key)
        return groups


def _address(node: Sequence[Any], fallback_host: str) -> Address:
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return (host or fallback_host, int(node[1]))


class Next(enum.Enum):
    DONE = "done"  # a reply, or an error that ends the call
    MOVED = "moved"  # the slot is another node's: update the map and go there
    ASK = "ask"  # the slot is moving: ask the importing node, once
    LATER = "later"  # not run (TRYAGAIN, CLUSTERDOWN, READONLY...): try again shortly


def next_step(reply: Any) -> Next:
    """What a script call's reply means for its routing.

    Every redirect and refusal handled here was given *before* the script
    ran, so following it cannot apply the call twice.
    """
    first = reply[0] if isinstance(reply, tuple) else reply
    if isinstance(first, MovedError):
        return Next.MOVED
    if isinstance(first, AskError):
        return Next.ASK
    # READONLY: the node was a primary when the map was read, and is a replica now;
    # LOADING: a restarted node reading its data back.
    if isinstance(first, (TryAgainError, ClusterDownError, ReadOnlyError, BusyLoadingError)):
        return Next.LATER
    return Next.DONE


def redirect_target(reply: Any) -> Address:
    first = reply[0] if isinstance(reply, tuple) else reply
    host, port = first.node_addr
    return (str(host), int(port))


class Route:
    """One call's way to the node that runs it: where next, and how long to keep trying.

    The routers (sync and asyncio) do the I/O; this decides. A pause of
    ``None`` means the call is over: its reply (or refusal) is final.
    """

    def __init__(self, key: str, deadline_s: float) -> None:
        self.slot = slot_of(key)
        self.deadline = time.monotonic() + deadline_s
        self.asking: Address | None = None
        self._redirects = 0
        self._pause = FIRST_PAUSE_S
        self._reread = False
        self._moved = False

    def node(self, slot_map: SlotMap) -> Address:
        return self.asking or slot_map.owner(self.slot)

    def not_sent(self) -> float | None:
        """Nothing left for the node (it could not be reached): read the map, try again."""
        self.asking = None
        self._reread = True
        return self._wait()

    def replied(self, reply: Any, mode: str, slot_map: SlotMap | None) -> float | None:
        step = next_step(reply)
        # One server has no map to wait for: a redirect means it is misconfigured
        # (the router says so), and a refusal will not change within a deadline.
        if step is Next.DONE or mode == "standalone":
            return None
        self.asking = None
        if step is not Next.LATER:
            # Waits are bounded by the deadline; redirects by their count as well.
            self._redirects += 1
            if self._redirects > _MAX_REDIRECTS:
                return None
        if step is Next.MOVED:
            if slot_map is not None:
                slot_map.moved(self.slot, redirect_target(reply))
            self._moved = True
            return 0.0
        if step is Next.ASK:
            self.asking = redirect_target(reply)
            return 0.0
        self._reread = True
        return self._wait()

    def take_reread(self, map_read_at: float) -> bool:
        """Whether the router should read the whole map again before the next try."""
        reread = self._reread or (self._moved and time.monotonic() - map_read_at > _REREAD_EVERY_S)
        self._reread = self._moved = False
        return reread

    def _wait(self) -> float | None:
        if time.monotonic() + self._pause >= self.deadline:
            return None
        pause = self._pause
        self._pause = min(pause * 2, LONGEST_PAUSE_S)
        return pause
