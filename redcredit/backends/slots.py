"""Which node owns which key: the slot map of a Redis Cluster, or one node for every key.

Pure data and pure decisions, shared by the synchronous and asyncio routers
(:mod:`.topology`): what to do with each reply a node gives a script call.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    TryAgainError,
)

__all__ = ["SLOTS", "Address", "Next", "SlotMap", "next_step", "slot_of"]

SLOTS: Final = 16384
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
    # READONLY: the node was a primary when the map was read, and is a replica now.
    if isinstance(first, (TryAgainError, ClusterDownError, ReadOnlyError)):
        return Next.LATER
    return Next.DONE


def redirect_target(reply: Any) -> Address:
    first = reply[0] if isinstance(reply, tuple) else reply
    host, port = first.node_addr
    return (str(host), int(port))
