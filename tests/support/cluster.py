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


def _ok(client: redis.Redis) -> bool:
    info = client.cluster("INFO")
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == 3
