"""The syncer: drains the journal streams into PostgreSQL, in batches, idempotently.

An entry leaves Redis only after PostgreSQL has committed it: the syncer reads
entries through a consumer group, writes a batch in one transaction, and only
then acknowledges and deletes them (``lua/ack.lua``). A crash anywhere in
between leaves the entries pending; they are claimed again and re-applied,
which changes nothing the second time. Several syncers may run at once: each
reads its own share of the partitions (:mod:`redcredit.ledger.partitions`), and the
partitions of one that died are taken over, pending entries and all, after
``sync_claim_idle``.

On a Redis Cluster the partitions live on several primaries: every step
sends one pipeline per node (:mod:`redcredit.backends.pipelines`), and the
waits that make a batch safe to commit (WAIT for the replicas, WAITAOF for
the disk) go on the connection of each node that holds the batch's streams.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self

import redis
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from psycopg_pool import ConnectionPool
from redis.client import Pipeline
from redis.exceptions import ResponseError
from redis.typing import StreamIdT

from ..backends.pipelines import (
    Command,
    RedisSource,
    run_commands,
    run_scripts,
)
from ..backends.postgres import apply_entries, fence_for_apply, postgres_errors_translated
from ..backends.postgres_loader import database_conninfo
from ..backends.redis import translated
from ..backends.topology import Topology
from ..config import Settings
from ..core.journal import JournalEntry, parse_entry, text
from ..core.keys import KeySpace
from ..core.scripts import load_scripts
from ..errors import BatchGone, RedCreditError
from .divergence import Divergence
from .durable import Confirmations
from .lag import SyncLag, read_lag
from .partitions import PartitionLeases

__all__ = ["BatchGone", "SyncLag", "Syncer"]

log = logging.getLogger("redcredit.ledger.syncer")


FaultHook = Callable[[str], None]


class Syncer:
    """Moves journal entries from Redis to PostgreSQL.

    Pass clients you own (a ``redis.Redis``, a ``redis.cluster.RedisCluster``
    or a :class:`~redcredit.backends.topology.Topology`), or let the syncer
    create them from the settings; only what it created is closed by
    :meth:`close`. ``fault_hook`` is called
    with ``"before_commit"`` and ``"after_commit"`` (before acknowledging),
    and by :class:`~redcredit.ledger.divergence.Divergence` around a re-base,
    for fault-injection tests.
    """

    def __init__(
        self,
        settings: Settings,
        redis_client: RedisSource = None,
        pool: ConnectionPool[Any] | None = None,
        *,
        consumer: str | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.settings = settings
        self.keys = KeySpace(settings.versioned_prefix, settings.partitions)
        self.streams = self.keys.journals()
        self._partition_of = {stream: p for p, stream in enumerate(self.streams)}
        self.group = settings.sync_group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # A client given lends its connections (one server) or its nodes and
        # credentials (a cluster) to a router of the syncer's own.
        self._owns_topology = not isinstance(redis_client, Topology)
        self.topology = (
            redis_client if isinstance(redis_client, Topology) else Topology(settings, redis_client)
        )
        self._owns_pool = pool is None
        self.pool = pool or ConnectionPool(
            database_conninfo(settings),
            min_size=1,
            max_size=2,
            # While PostgreSQL is down a tick gives up soon, and backs off.
            timeout=settings.database_timeout.total_seconds(),
            open=True,
        )
        self._ack = load_scripts()["ack"]
        self._fault = fault_hook or (lambda _stage: None)
        self.divergence = Divergence(settings, self.topology, self.pool, self._fault)
        self._held: list[JournalEntry] = []  # read, not yet committed
        self._waiting: list[JournalEntry] = []  # committed around: an earlier entry is missing
        self._groups_ready = False
        self._confirmations = Confirmations(settings, self.topology)
        self.leases = PartitionLeases(
            self.topology, self.keys, self.group, self.consumer, settings.sync_claim_idle
        )
        self._next_renewal = 0.0
        # Partitions whose pending entries are all ours to claim now: taken
        # over from another syncer, or ours again after a batch was set aside.
        self._claim_now: set[int] = set()
        self._next_claim = 0.0
        self._rotation = 0
        self._failures = 0
        self._retry_at = 0.0
        self._scheduler: BaseScheduler | None = None
        self._owns_scheduler = False
        self._tick_lock = threading.Lock()
        self.applied = 0  # entries committed by this syncer (including re-deliveries)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        try:
            self.leases.release_all()
        except RedCreditError as exc:
            # The leases lapse by themselves; the others only wait longer.
            log.info("could not hand back the partitions: %s", exc)
        if self._owns_pool:
            self.pool.close()
        if self._owns_topology:
            self.topology.close()

    # -- one batch -------------------------------------------------------------

    def ensure_groups(self) -> None:
        if self._groups_ready:
            return
        commands = [
            Command.of(stream, Pipeline.xgroup_create, stream, self.group, id="0", mkstream=True)
            for stream in self.streams
        ]
        for result in run_commands(self.topology, commands).replies:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise translated(result)
        self._groups_ready = True

    def renew_leases(self) -> None:
        """Keeps this syncer's share of the partitions, at most every quarter lease."""
        if time.monotonic() < self._next_renewal:
            return
        change = self.leases.renew()
        self._next_renewal = time.monotonic() + self.settings.sync_claim_idle.total_seconds() / 4
        self._confirmations.forget()
        self._claim_now |= change.gained
        if change.lost:
            # Their next reader claims these from the group, pending as they are.
            self._claim_now -= change.lost
            self._waiting = [
                e for e in self._waiting if self._partition_of[e.stream] not in change.lost
            ]

    def read_batch(self) -> list[JournalEntry]:
        """Up to about a batch from this syncer's partitions: pending entries first, then new ones.

        A partition with entries waiting for an earlier one is not read
        further: what it would give would only wait too.
        """
        self.ensure_groups()
        self.renew_leases()
        owned = sorted(self.leases.held)
        limit = self.settings.sync_batch_size
        entries = self._claim(sorted(self._claim_now.intersection(owned)), 0, limit)
        if time.monotonic() >= self._next_claim:
            idle_ms = int(self.settings.sync_claim_idle.total_seconds() * 1000)
            entries += self._claim(owned, idle_ms, limit)
            self._next_claim = time.monotonic() + self.settings.sync_claim_idle.total_seconds() / 2
        blocked = {self._partition_of[entry.stream] for entry in self._waiting}
        readable = [p for p in owned if p not in blocked]
        # Ask only the partitions that hold entries, and no more than a batch in
        # all; a stream's length also counts entries in flight, so this may
        # read a little less than a batch, never much more.
        remaining = limit - len(entries)
        lengths = run_commands(
            self.topology,
            [Command.of(self.streams[p], Pipeline.xlen, self.streams[p]) for p in readable],
        ).checked()
        # Rotate the first partition read, so a busy one cannot starve the rest.
        first = self._rotation % max(len(readable), 1)
        self._rotation += 1
        reads: list[Command] = []
        for i in range(len(readable)):
            index = (first + i) % len(readable)
            if remaining <= 0:
                break
            if lengths[index]:
                count = min(int(lengths[index]), remaining)
                stream = self.streams[readable[index]]
                reads.append(self._read_new(stream, count))
                remaining -= count
        if reads:
            for reply in run_commands(self.topology, reads).checked():
                for stream, messages in reply or []:
                    entries += [parse_entry(stream, sid, fields) for sid, fields in messages]
        # A claim may return what another claim in this call did.
        return list({entry.identity: entry for entry in entries}.values())

    def _read_new(self, stream: str, count: int) -> Command:
        group, consumer = self.group, self.consumer
        return Command(
            stream, lambda pipe: pipe.xreadgroup(group, consumer, {stream: ">"}, count=count)
        )

    def _claim_ids(self, stream: str, stream_ids: list[str]) -> Command:
        group, consumer = self.group, self.consumer
        ids: list[StreamIdT] = list(stream_ids)
        return Command(
            stream, lambda pipe: pipe.xclaim(stream, group, consumer, 0, ids, justid=True)
        )

    def _claim(self, partitions: list[int], idle_ms: int, limit: int) -> list[JournalEntry]:
        """Pending entries of these partitions idle for ``idle_ms``, whoever had them."""
        if not partitions:
            return []
        claims = [
            Command.of(
                self.streams[p],
                Pipeline.xautoclaim,
                self.streams[p],
                self.group,
                self.consumer,
                idle_ms,
                "0-0",
                count=limit,
            )
            for p in partitions
        ]
        claimed: list[JournalEntry] = []
        for p, reply in zip(partitions, run_commands(self.topology, claims).checked(), strict=True):
            cursor, messages = text(reply[0]), reply[1]
            stream = self.streams[p]
            claimed += [parse_entry(stream, sid, fields) for sid, fields in messages if fields]
            if idle_ms == 0:
                if cursor == "0-0":
                    self._claim_now.discard(p)
                else:  # more than a batch pending: the rest next time
                    self._claim_now.add(p)
        if claimed:
            log.info("claimed %d journal entries left pending", len(claimed))
        return claimed

    def commit(self, entries: list[JournalEntry]) -> list[JournalEntry]:
        """One PostgreSQL transaction for the batch; then acknowledge and delete.

        Returns the entries that wait for an earlier entry of their account
        (see :func:`~redcredit.backends.postgres.apply_entries`), or for the
        re-base of a fork of their account: neither applied nor acknowledged.
        Raises :class:`BatchGone` (committing nothing) when
        Redis no longer holds the batch: it lost its data since it was read,
        and :class:`~redcredit.errors.BackendUnavailable` when PostgreSQL fails.
        """
        by_stream: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            by_stream[entry.stream].append(entry.stream_id)
        partitions = [self._partition_of[stream] for stream in by_stream]
        if self._confirmations.wanted:
            self._claim_again(by_stream, confirm=True)
        with (
            postgres_errors_translated("write the batch to PostgreSQL"),
            self.pool.connection() as conn,
            conn.transaction(),
        ):
            fence_for_apply(conn, self.settings.pg_schema, partitions)
            # A history that forked from the ledger's is kept apart (ledger/divergence.py).
            sorting = self.divergence.sort(conn, entries)
            waiting = apply_entries(conn, self.settings.pg_schema, sorting.apply)
            self._fault("before_commit")
            self._claim_again(by_stream, confirm=False)
        self._fault("after_commit")
        held = sorting.held_back(waiting)
        done: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            if entry.identity not in held:
                done[entry.stream].append(entry.stream_id)
        acks = [([stream], [self.group, *ids]) for stream, ids in done.items()]
        run_scripts(self.topology, self._ack, acks)
        return [entry for entry in entries if entry.identity in held]

    def _claim_again(self, by_stream: dict[str, list[str]], *, confirm: bool) -> None:
        """Raises :class:`BatchGone` unless Redis still has every entry of the batch.

        Claiming the entries again tells whether each is still pending. It is
        also a write, so with ``confirm`` a WAIT and a WAITAOF after it on the
        same connection of each node wait until the entries are on its
        replicas and on its disk: PostgreSQL must never hold an entry that a
        promoted replica, or a Redis restarted from its append-only file,
        forgot, or the account would reuse its sequence number for another
        change.
        """
        commands = [self._claim_ids(stream, ids) for stream, ids in by_stream.items()]
        tail = self._confirmations.add if confirm else None
        done = run_commands(self.topology, commands, tail=tail)
        for (stream, ids), claimed in zip(by_stream.items(), done.replies, strict=True):
            if isinstance(claimed, Exception) or len(claimed) != len(ids):
                raise BatchGone(f"{stream} no longer holds {len(ids)} entries read from it")
        if confirm:
            self._confirmations.check(done.tails)

    def run_once(self) -> int:
        """Reads and persists one batch; returns the number of entries persisted."""
        # Also while a batch is retried (PostgreSQL down): the partitions stay ours.
        self.renew_leases()
        self.divergence.rebase_due(self.leases.held)
        if not self._held:
            # Entries that waited for an earlier one of their account go again,
            # with what is new (which may be that earlier one, claimed from a
            # syncer that died).
            fresh = self.read_batch()
            waited = {entry.identity for entry in self._waiting}
            self._held = self._waiting + [e for e in fresh if e.identity not in waited]
            self._waiting = []
        if not self._held:
            return 0
        # Kept until committed: a failed commit is retried with the same entries.
        try:
            self._waiting = self.commit(self._held)
        except BatchGone as gone:
            # Another syncer took some over (they are its to commit), or Redis
            # restarted without them: the unsynced window lost with it, while
            # the accounts reload from PostgreSQL. Either way, not ours to commit.
            log.warning(
                "set aside a batch of %d entries, committing none: %s (another syncer "
                "claimed them, or Redis lost its data)",
                len(self._held),
                gone,
            )
            self._held = []
            self._groups_ready = False
            # What is still pending in our partitions is ours: claim it afresh.
            self._claim_now |= self.leases.held
            return 0
        count = len(self._held) - len(self._waiting)
        self._held = []
        self.applied += count
        return count

    def tick(self, budget_s: float | None = None) -> int:
        """Persists batches until the journal is empty or the time budget is spent.

        Failures (PostgreSQL or Redis down) are logged and retried later with
        exponential backoff; no entry is dropped.
        """
        # A second run of the job while one is still going returns at once:
        # the scheduler allows two instances so that it never logs a skip.
        if not self._tick_lock.acquire(blocking=False):
            return 0
        try:
            return self._tick(budget_s)
        finally:
            self._tick_lock.release()

    def _tick(self, budget_s: float | None) -> int:
        if time.monotonic() < self._retry_at:
            return 0
        budget = budget_s if budget_s is not None else self._budget()
        until = time.monotonic() + budget
        total = 0
        try:
            while (count := self.run_once()) and time.monotonic() < until:
                total += count
            total += count
        except (redis.RedisError, RedCreditError, OSError) as exc:
            if "NOGROUP" in str(exc):
                # Redis lost its data (a restart without persistence): the
                # consumer groups go with it and are made again.
                self._groups_ready = False
            # A read whose reply was lost left entries pending to this syncer
            # that no read of new entries returns: claim them next time.
            self._claim_now |= self.leases.held
            self._failures += 1
            delay = min(self.settings.sync_retry_max.total_seconds(), 0.05 * 2**self._failures)
            self._retry_at = time.monotonic() + delay
            log.warning("sync failed (%s); retrying in %.2f s: %s", type(exc).__name__, delay, exc)
            return total
        self._failures = 0
        return total

    def _budget(self) -> float:
        # Within one scheduler interval, so runs of the job do not overlap.
        return max(self.settings.sync_interval.total_seconds() * 0.9, 0.01)

    def drain(self, timeout_s: float = 60.0) -> SyncLag:
        """Persists everything journaled so far (tests, shutdown, the demo)."""
        until = time.monotonic() + timeout_s
        while True:
            self.tick(budget_s=max(until - time.monotonic(), 0.01))
            lag = self.lag()
            if lag.caught_up or time.monotonic() >= until:
                return lag
            time.sleep(0.02)

    # -- lag -------------------------------------------------------------------

    def lag(self) -> SyncLag:
        """Summed over the nodes (see :func:`~redcredit.ledger.lag.read_lag`)."""
        return read_lag(self.topology, self.streams, self.group)

    # -- scheduling ------------------------------------------------------------

    def start(self, scheduler: BaseScheduler | None = None) -> BaseScheduler:
        """Runs :meth:`tick` every ``sync_interval`` as an APScheduler job.

        With no scheduler given, a background one is created and started (and
        shut down by :meth:`stop`); a given scheduler only gets the job.
        """
        self._owns_scheduler = scheduler is None
        self._scheduler = scheduler or BackgroundScheduler(daemon=True)
        self._scheduler.add_job(
            self.tick,
            "interval",
            seconds=self.settings.sync_interval.total_seconds(),
            id=f"redcredit-sync-{self.consumer}",
            max_instances=2,
            coalesce=True,
            misfire_grace_time=None,
        )
        if self._owns_scheduler:
            self._scheduler.start()
        return self._scheduler

    def stop(self) -> None:
        if self._scheduler is None:
            return
        if self._owns_scheduler:
            self._scheduler.shutdown(wait=True)
        else:
            self._scheduler.remove_job(f"redcredit-sync-{self.consumer}")
        self._scheduler = None

    @contextmanager
    def running(self) -> Iterator[Syncer]:
        """``with syncer.running():`` for an app's lifespan; drains what it can on exit."""
        self.start()
        try:
            yield self
        finally:
            self.stop()
            self.tick(budget_s=5)
