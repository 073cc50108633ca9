"""A Redis that is up and answers, yet refuses every write for now: OOM or READONLY.

``OOM`` is ``maxmemory 1`` under ``noeviction``; ``READONLY`` is the server
made a replica of an empty primary, as after a failover that left a client
on the old primary. :meth:`Refusing.refusing` turns it on for a block and
back off after, so one server serves a whole test module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import redis

from redcredit.servers.redis import EmbeddedRedis

KINDS = ("OOM", "READONLY")


class Refusing:
    def __init__(self, kind: str, server: EmbeddedRedis, primary: EmbeddedRedis | None) -> None:
        self.kind = kind
        self.server = server
        self.primary = primary
        self.control = redis.Redis.from_url(server.url)

    @property
    def url(self) -> str:
        return self.server.url

    @contextmanager
    def refusing(self) -> Iterator[None]:
        self._refuse()
        try:
            yield
        finally:
            self._heal()

    def _refuse(self) -> None:
        if self.primary is None:
            self.control.config_set("maxmemory-policy", "noeviction")
            self.control.config_set("maxmemory", 1)
            return
        self.control.replicaof("127.0.0.1", self.primary.port)
        # Until the first sync is done the replica answers LOADING, not READONLY.
        deadline = time.monotonic() + 10
        while self.control.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise TimeoutError("the replica did not sync with its primary")
            time.sleep(0.02)

    def _heal(self) -> None:
        if self.primary is None:
            self.control.config_set("maxmemory", 0)
        else:
            self.control.replicaof("NO", "ONE")


@contextmanager
def refusing_server(kind: str) -> Iterator[Refusing]:
    """A server of its own (and for READONLY its empty primary), stopped on exit."""
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedRedis())
        # Without the delay a primary waits 5 s for more replicas before it syncs one.
        primary = (
            stack.enter_context(EmbeddedRedis(extra_args=("--repl-diskless-sync-delay", "0")))
            if kind == "READONLY"
            else None
        )
        refusing = Refusing(kind, server, primary)
        stack.callback(refusing.control.close)
        yield refusing
