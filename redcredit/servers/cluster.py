"""A real Redis Cluster on loopback, for the tests, the benchmarks and trying things out.

    with EmbeddedCluster(primaries=3) as cluster:
        settings = Settings(redis_url=cluster.url, redis_cluster=True)

Every node is an :class:`~redcredit.servers.redis.EmbeddedRedis` in cluster
mode: each primary claims an even share of the 16384 slots when it starts,
the nodes meet, and each replica (``replicas_per_primary``) replicates its
primary. :meth:`EmbeddedCluster.start` returns only once every node reports
the cluster ok, every replica is in sync and every node gives the same
complete CLUSTER SLOTS, so a client's first look at the map is the whole
map.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from types import TracebackType
from typing import Any, Self

import redis

from ..errors import EmbeddedServerError
from .redis import EmbeddedRedis

__all__ = ["EmbeddedCluster"]

_SLOTS = 16384


class EmbeddedCluster:
    """``primaries`` primaries with an even share of the slots each, and their replicas.

    ``password``, ``appendonly`` and ``extra_args`` apply to every node (a
    replica also authenticates to its primary with the password). Keep a
    reference or use ``with``: nodes whose objects are garbage-collected are
    stopped.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas_per_primary: int = 0,
        *,
        password: str | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        if isinstance(primaries, bool) or not isinstance(primaries, int):
            raise EmbeddedServerError(f"primaries must be an int, not {primaries!r}")
        if isinstance(replicas_per_primary, bool) or not isinstance(replicas_per_primary, int):
            raise EmbeddedServerError(
                f"replicas_per_primary must be an int, not {replicas_per_primary!r}"
            )
        if not 1 <= primaries <= _SLOTS:
            raise EmbeddedServerError(f"primaries must be 1..{_SLOTS}, not {primaries}")
        if replicas_per_primary < 0:
            raise EmbeddedServerError(
                f"replicas_per_primary must be 0 or more, not {replicas_per_primary}"
            )
        self._primary_count = primaries
        self._replica_count = replicas_per_primary
        self.password = password or None
        self.appendonly = appendonly
        # No delay before a replica's first sync (the default waits 5 s for
        # more replicas to share it), and a primary's offset moves past 0 within
        # a second of it (CLUSTER SLOTS leaves out replicas at offset 0; the
        # default pings replicas every 10 s).
        self.extra_args = (
            "--repl-diskless-sync-delay", "0",
            "--repl-ping-replica-period", "1",
            *extra_args,
        )  # fmt: skip
        self._startup_timeout = startup_timeout
        self.primaries: list[EmbeddedRedis] = []
        self.replicas: list[EmbeddedRedis] = []  # those of the first primary, then the second's...

    # -- what callers use ----------------------------------------------------------------------

    @property
    def nodes(self) -> list[EmbeddedRedis]:
        """Every node, the primaries first (roles as started; a failover may change them)."""
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        """The URL of the first primary: any node is a way in to the whole cluster."""
        if not self.primaries:
            raise EmbeddedServerError("the cluster has not been started, so it has no URL")
        return self.primaries[0].url

    @property
    def urls(self) -> list[str]:
        """The URL of every node, the primaries first."""
        return [node.url for node in self.nodes]

    @property
    def seed_nodes(self) -> tuple[str, ...]:
        """``host:port`` of every node, as the ``redis_seed_nodes`` setting takes them."""
        return tuple(f"127.0.0.1:{node.port}" for node in self.nodes)

    @property
    def running(self) -> bool:
        return bool(self.primaries) and all(node.running for node in self.nodes)

    def replicas_of(self, primary: EmbeddedRedis) -> list[EmbeddedRedis]:
        """The replicas started for ``primary``."""
        index = self.primaries.index(primary)
        count = self._replica_count
        return self.replicas[index * count : (index + 1) * count]

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        """Start every node and form the cluster; raises EmbeddedServerError, leaving no node."""
        if self.primaries:
            raise EmbeddedServerError("the cluster is already started")
        deadline = time.monotonic() + self._startup_timeout
        with ExitStack() as stack:
            count = self._primary_count
            bounds = [index * _SLOTS // count for index in range(count + 1)]
            primaries = [
                stack.enter_context(self._node(range(start, stop)))
                for start, stop in itertools.pairwise(bounds)
            ]
            replicas = [
                stack.enter_context(self._node(range(0)))  # made a replica once formed
                for _ in range(count * self._replica_count)
            ]
            try:
                _Formation(primaries, replicas, self.password, deadline).run()
            except (redis.RedisError, OSError) as exc:
                raise EmbeddedServerError(
                    f"the cluster of {self._describe()} could not be formed: {exc}"
                ) from exc
            # Formed: from here on the nodes are ours to stop, not the stack's.
            stack.pop_all()
        self.primaries, self.replicas = primaries, replicas
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node (SIGKILL after ``timeout`` s each) and remove their data folders."""
        nodes, self.primaries, self.replicas = self.nodes, [], []
        for node in nodes:
            node.stop(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        ports = ",".join(str(node.port) for node in self.nodes) or "stopped"
        return f"<{type(self).__name__} {self._describe()} ports={ports}>"

    def _describe(self) -> str:
        return f"{self._primary_count} primaries x {self._replica_count} replicas"

    def _node(self, slots: range) -> EmbeddedRedis:
        extra = list(self.extra_args)
        if self.password is not None:
            extra += ["--masterauth", self.password]
        return EmbeddedRedis(
            cluster=True,
            cluster_slots=slots,
            password=self.password,
            appendonly=self.appendonly,
            extra_args=extra,
        )


class _Formation:
    """Meeting, replicating and waiting until every node tells the same story."""

    def __init__(
        self,
        primaries: list[EmbeddedRedis],
        replicas: list[EmbeddedRedis],
        password: str | None,
        deadline: float,
    ) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.nodes = [*primaries, *replicas]
        self.password = password
        self.deadline = deadline

    def run(self) -> None:
        clients = [self._client(node) for node in self.nodes]
        try:
            # Distinct epochs from the start: no collision for the nodes to settle
            # first, and a later failover's election goes the same way each time.
            for epoch, client in enumerate(clients, start=1):
                _command(client, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
            # Each replica follows its primary before the others meet them, so
            # they learn its role in their first exchange instead of by gossip
            # (seconds later, with the default node timeout).
            if self.replicas:
                self._replicate(clients)
            first = clients[0]
            for node in self.nodes[1:]:
                _command(first, "CLUSTER", "MEET", "127.0.0.1", node.port)
            self._wait(lambda: self._everyone_knows_everyone(clients), "the nodes to meet")
            self._wait(lambda: self._agreed(clients), "every node to agree on the map")
        finally:
            for client in clients:
                client.close()

    def _client(self, node: EmbeddedRedis) -> redis.Redis:
        return redis.Redis(port=node.port, password=self.password, socket_timeout=5)

    def _replicate(self, clients: list[redis.Redis]) -> None:
        per_primary = len(self.replicas) // len(self.primaries)
        ids = [_text(_command(client, "CLUSTER", "MYID")) for client in clients]
        followers = [
            (client, self.primaries[index // per_primary], ids[index // per_primary])
            for index, client in enumerate(clients[len(self.primaries) :])
        ]
        for client, primary, _ in followers:
            _command(client, "CLUSTER", "MEET", "127.0.0.1", primary.port)
        for client, _, primary_id in followers:
            self._wait(partial(_knows, client, primary_id), "each replica to meet its primary")
            _command(client, "CLUSTER", "REPLICATE", primary_id)
        # In sync before the others meet them, so their first exchange with a
        # replica tells them its offset: CLUSTER SLOTS leaves out replicas at
        # offset 0, and the offset otherwise spreads only as fast as the nodes
        # ping each other (seconds, with the default node timeout).
        for client, _, _ in followers:
            self._wait(partial(_in_sync, client), "each replica to sync")
        for primary, client in zip(self.primaries, clients, strict=False):
            self._wait(
                partial(_lists_replicas, client, primary.port, per_primary),
                "each primary to list its replicas",
            )

    def _wait(self, check: Callable[[], str | None], what: str) -> None:
        pause = 0.02
        while True:
            reason = check()
            if reason is None:
                return
            if time.monotonic() >= self.deadline:
                raise EmbeddedServerError(f"gave up waiting for {what}: {reason}")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _everyone_knows_everyone(self, clients: list[redis.Redis]) -> str | None:
        for node, client in zip(self.nodes, clients, strict=True):
            # Counted with nodes still in handshake, so it may pass the total for a while.
            known = int(client.cluster("INFO").get("cluster_known_nodes", 0))
            if known != len(self.nodes):
                return f"node {node.port} knows {known} of {len(self.nodes)} nodes"
        return None

    def _agreed(self, clients: list[redis.Redis]) -> str | None:
        per_primary = len(self.replicas) // len(self.primaries)
        maps = []
        for node, client in zip(self.nodes, clients, strict=True):
            state = client.cluster("INFO").get("cluster_state")
            if state != "ok":
                return f"node {node.port} says the cluster is {state}"
            if node in self.replicas:
                link = client.info("replication").get("master_link_status")
                if link != "up":
                    return f"replica {node.port} has its link to its primary {link}"
            slots = _command(client, "CLUSTER", "SLOTS")
            maps.append(sorted(_shape(entry) for entry in slots))
            if any(len(entry) - 3 != per_primary for entry in slots):
                return f"node {node.port} does not list {per_primary} replicas for every range"
        if any(other != maps[0] for other in maps[1:]):
            return "the nodes do not give the same CLUSTER SLOTS yet"
        return None


def _knows(client: redis.Redis, node_id: str) -> str | None:
    nodes = _text(_command(client, "CLUSTER", "NODES"))
    for line in nodes.splitlines():
        fields = line.split()
        if fields and fields[0] == node_id and "handshake" not in fields[2]:
            return None
    return f"{node_id} is not among its known nodes yet"


def _in_sync(client: redis.Redis) -> str | None:
    info = client.info("replication")
    link, offset = info.get("master_link_status"), int(info.get("slave_repl_offset", 0))
    return None if link == "up" and offset > 0 else f"link {link}, offset {offset}"


def _lists_replicas(client: redis.Redis, port: int, count: int) -> str | None:
    for entry in _command(client, "CLUSTER", "SLOTS"):
        if int(entry[2][1]) == port and len(entry) - 3 != count:
            return f"node {port} lists {len(entry) - 3} of its {count} replicas"
    return None


def _command(client: redis.Redis, *args: str | int) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shape(entry: Sequence[Any]) -> tuple[Any, ...]:
    """A range of CLUSTER SLOTS as comparable values: its bounds and the nodes' ports."""
    start, stop, primary, *replicas = entry
    return (int(start), int(stop), int(primary[1]), *sorted(int(node[1]) for node in replicas))
