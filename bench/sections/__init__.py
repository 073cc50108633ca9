"""The registry of sections, in the order they run and are reported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..harness import Config, Results, Servers
from . import (
    buckets,
    ceiling,
    clients,
    cluster,
    cluster_drain,
    http,
    limits,
    memory,
    reservations,
    scopes,
    write_behind,
)


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Config, Servers, Results], None]
    redis_port: bool = False  # connects by host and port, not through redcredit's URL
    postgres: bool = False  # PostgreSQL starts only when a selected section needs it
    cluster: bool = False  # so does a Redis Cluster

    def servers(
        self,
        redis_url: str,
        redis_port: int,
        postgres_url: str | None,
        cluster_urls: tuple[str, ...] | None = None,
    ) -> Servers:
        """Only what this section declares, so that an undeclared need fails even when another
        selected section happens to have started the server."""
        return Servers(
            self.name,
            redis_url,
            redis_port if self.redis_port else None,
            postgres_url if self.postgres else None,
            cluster_urls if self.cluster else None,
        )


SECTIONS = (
    Section("ceiling", ceiling.run, redis_port=True),
    Section("async", clients.run_async),
    Section("sync", clients.run_sync),
    Section("db", write_behind.run_db, postgres=True),
    Section("limits", limits.run, redis_port=True),
    Section("reserve", reservations.run_reserve),
    Section("chat", reservations.run_chat),
    Section("buckets", buckets.run),
    Section("scopes", scopes.run),
    Section("spread", clients.run_spread),
    Section("syncer", write_behind.run_syncer, postgres=True),
    Section("memory", memory.run),
    Section("http", http.run, postgres=True),
    Section("cluster", cluster.run, cluster=True),
    Section("cluster-drain", cluster_drain.run, postgres=True, cluster=True),
)
NAMES = tuple(section.name for section in SECTIONS)
