"""A real Redis Cluster of three primaries on loopback, each owning a third of the slots."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import redis

from redcredit.servers.redis import EmbeddedRedis

SLOTS = 16384


@contextmanager
def three_primaries(timeout_s: float = 20.0) -> Iterator[list[EmbeddedRedis]]:
    """Three cluster nodes that have met and agree the cluster is ok; stopped on exit."""
    bounds = [0, SLOTS // 3, 2 * SLOTS // 3, SLOTS]
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(EmbeddedRedis(cluster=True, cluster_slots=range(a, b)))
            for a, b in itertools.pairwise(bounds)
        ]
        clients = [stack.enter_context(redis.Redis(port=node.port)) for node in nodes]
        for node in nodes[1:]:
            clients[0].cluster("MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + timeout_s
        while not all(_ok(client) for client in clients):
            if time.monotonic() > deadline:
                infos = [client.cluster("INFO") for client in clients]
                raise TimeoutError(f"the three nodes did not form a cluster: {infos}")
            time.sleep(0.05)
        yield nodes


def _ok(client: redis.Redis, nodes: int = 3) -> bool:
    info = client.cluster("INFO")
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == nodes


@contextmanager
def replica_of(primary: EmbeddedRedis, timeout_s: float = 20.0) -> Iterator[EmbeddedRedis]:
    """A cluster node that replicates ``primary``, in sync when yielded; stopped on exit."""
    with EmbeddedRedis(cluster=True, cluster_slots=range(SLOTS - 1, SLOTS)) as replica:
        with redis.Redis(port=replica.port) as node, redis.Redis(port=primary.port) as source:
            # A node starts owning a slot; a replica may own none.
            node.execute_command("CLUSTER", "FLUSHSLOTS")
            node.cluster("MEET", "127.0.0.1", primary.port)
            primary_id = source.execute_command("CLUSTER", "MYID")
            # Otherwise the primary waits 5 s for more replicas before the first sync.
            source.config_set("repl-diskless-sync-delay", 0)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    node.execute_command("CLUSTER", "REPLICATE", primary_id)
                    break
                except redis.ResponseError:  # the primary is not known to it yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            while node.info("replication").get("master_link_status") != "up" or not _ok(node, 4):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the replica did not sync: {node.info('replication')}")
                time.sleep(0.05)
        yield replica


def migrate_keys(slot: int, source: EmbeddedRedis, target: EmbeddedRedis) -> int:
    """Starts moving ``slot`` to ``target`` and moves its keys: the source answers ASK now.

    Returns how many keys moved; :func:`hand_over` finishes the move.
    """
    with redis.Redis(port=source.port) as old, redis.Redis(port=target.port) as new:
        old_id, new_id = (
            old.execute_command("CLUSTER", "MYID"),
            new.execute_command("CLUSTER", "MYID"),
        )
        new.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", old_id)
        old.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", new_id)
        keys = old.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10_000)
        if keys:
            old.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        return len(keys)


def hand_over(slot: int, target: EmbeddedRedis, nodes: list[EmbeddedRedis]) -> None:
    """Ends the move of ``slot``: it is ``target``'s, and the others answer MOVED."""
    with redis.Redis(port=target.port) as new:
        new_id = new.execute_command("CLUSTER", "MYID")
    for node in [target, *(n for n in nodes if n is not target)]:
        with redis.Redis(port=node.port) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", new_id)
