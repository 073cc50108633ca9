"""The cluster mode: three primaries with a replica each, and the faults a cluster meets.

The application, the syncers and the killed client reach the cluster by
settings alone: one node's URL and the others as seed nodes, so that any of
them may be down when a process starts. Each failover is recorded as a
:class:`Loss` over the partitions the failed primary served, so the checks
count what it cost: the acknowledged calls it took, every one later than all
that PostgreSQL had committed for its account.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis

from redcredit.backends.migrate import migrate
from redcredit.backends.slots import slot_of
from redcredit.core.keys import KeySpace
from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis
from tests.properties.sim.faults import Injector
from tests.properties.sim.world import SCHEMA, Ground, Loss, sim_settings
from tests.support.cluster import ClusterHarness

FAILOVER_KINDS = ("cluster_failover", "primary_sigkill", "lagging_failover")
CLUSTER_KINDS = (
    *FAILOVER_KINDS,
    "slot_migration",
    "script_flush",
    "postgres_stop_start",
    "syncer_sigkill",
    "syncer_dies_before_commit",
    "syncer_dies_after_commit",
    "client_killed_holding_reservations",
)
# Below the syncer's one-second WAIT: a batch read in the window waits for the
# cut-off replica until the primary dies, and is never committed.
LAG_WINDOW_S = (0.2, 0.6)


@dataclass(kw_only=True)
class ClusterWorld(Ground):
    """A Redis Cluster (3 primaries, 3 replicas), PostgreSQL, and syncer processes."""

    cluster: ClusterHarness
    keys: KeySpace

    @classmethod
    def start(cls, syncers: int = 2) -> ClusterWorld:
        harness = ClusterHarness(primaries=3, replicas=1).start()
        try:
            postgres = EmbeddedPostgres().start()
        except BaseException:
            harness.close()
            raise
        first, *others = harness.servers
        seeds = [f"127.0.0.1:{server.port}" for server in others]
        app = sim_settings(first.url, postgres.url, redis_seed_nodes=seeds)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            migrate(conn, SCHEMA)
        world = cls(
            cluster=harness,
            keys=KeySpace(app.versioned_prefix, app.partitions),
            postgres=postgres,
            settings=app,
            direct=app,
        )
        for _ in range(syncers):
            world.spawn_syncer()
        return world

    def close(self) -> None:
        for process in self.syncers.values():
            process.kill()
            process.wait()
        self.cluster.close()
        self.postgres.close()

    def checks_client(self) -> redis.RedisCluster:
        return redis.RedisCluster.from_url(self.cluster.url)

    # -- faults ----------------------------------------------------------------

    def failed_over(
        self,
        kind: str,
        victim: EmbeddedRedis,
        fault: Callable[[Callable[[], None]], object],
    ) -> None:
        """Runs ``fault(mark)``, which calls ``mark()`` just before the primary stops serving.

        What PostgreSQL holds is read at the mark: nothing the fault's window
        wrote can be committed after it, for no replica confirms it.
        """
        partitions = self.partitions_on(victim)
        marks: list[tuple[int, float, dict[str, int]]] = []

        def mark() -> None:
            marks.append((self.server_ms(), time.monotonic(), self.persisted_seqs()))

        fault(mark)
        server_ms, at, synced = marks[0]
        self.losses.append(Loss(server_ms, at, synced, kind=kind, partitions=partitions))
        self.epoch += 1

    def partitions_on(self, primary: EmbeddedRedis) -> frozenset[int]:
        owned = next(node.slots for node in self.cluster.nodes if node.server is primary)
        return frozenset(
            p
            for p in range(self.keys.partitions)
            if any(slot_of(self.keys.journal(p)) in share for share in owned)
        )

    def script_flush(self) -> None:
        for server in self.cluster.running:
            with redis.Redis(port=server.port, socket_timeout=5) as node:
                node.script_flush()

    # -- reading state ---------------------------------------------------------

    def server_ms(self) -> int:
        with redis.Redis(port=self.cluster.primaries[0].port, socket_timeout=5) as node:
            seconds, micros = node.time()
        return int(seconds) * 1000 + int(micros) // 1000


class ClusterInjector(Injector):
    """The cluster's faults, and those of PostgreSQL, the syncers and a client."""

    def __init__(self, world: ClusterWorld, seed: int, accounts: list[str]) -> None:
        super().__init__(world, seed)
        self.cluster_world = world
        self.accounts = accounts

    def actions(self) -> dict[str, Callable[[], None]]:
        return {
            "cluster_failover": self._graceful,
            "primary_sigkill": self._sigkill,
            "lagging_failover": self._lagging,
            "slot_migration": self._slot_migration,
            "script_flush": self.cluster_world.script_flush,
            **self.common_actions(),
        }

    def _victim(self) -> EmbeddedRedis:
        return self.rng.choice(sorted(self.cluster_world.cluster.primaries, key=lambda s: s.port))

    def _graceful(self) -> None:
        world, victim = self.cluster_world, self._victim()

        def fault(mark: Callable[[], None]) -> None:
            mark()
            world.cluster.failover(victim)

        world.failed_over("cluster_failover", victim, fault)

    def _sigkill(self) -> None:
        world, victim = self.cluster_world, self._victim()

        def fault(mark: Callable[[], None]) -> None:
            mark()
            world.cluster.kill_primary(victim)
            world.cluster.rejoin(victim)

        world.failed_over("primary_sigkill", victim, fault)

    def _lagging(self) -> None:
        world, victim = self.cluster_world, self._victim()
        window_s = self.rng.uniform(*LAG_WINDOW_S)

        def fault(mark: Callable[[], None]) -> None:
            def during() -> None:
                time.sleep(window_s)  # the load writes what the replicas will miss
                mark()

            world.cluster.lagging_failover(victim, during)
            world.cluster.rejoin(victim)

        world.failed_over("lagging_failover", victim, fault)

    def _slot_migration(self) -> None:
        """Moves the slot of an account of the load, a few keys a batch, under its calls."""
        world = self.cluster_world
        account = self.rng.choice(self.accounts)
        slot = slot_of(world.keys.journal(world.keys.partition(account)))
        source = world.cluster.primary_for_slot(slot)
        others = sorted(
            (p for p in world.cluster.primaries if p is not source), key=lambda s: s.port
        )
        pause_s = self.rng.uniform(0.05, 0.3)
        world.cluster.migrate_slot(
            slot, self.rng.choice(others), batch=10, between=lambda: time.sleep(pause_s)
        )
