"""A real Redis Cluster on loopback, and the faults the tests inflict on it.

:class:`ClusterHarness` starts N primaries (the slots split evenly) with R
replicas each, and breaks them the ways production does: a graceful failover,
a crashed primary, a failover onto a replica that missed the last writes, a
slot moved while callers use it. Every fault returns only once every live node
reports the cluster ok and the same slot owners and replicas, so a test goes
on from a settled cluster. Everything here speaks to the nodes with plain
redis-py clients.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import redis
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, TryAgainError

from redcredit.servers.cluster import EmbeddedCluster
from redcredit.servers.redis import EmbeddedRedis

SLOTS = 16384
NODE_TIMEOUT_MS = 1000

# What makes a failover happen the same way every time, and soon.
_NODE_ARGS = (
    # However long a replica was paused or cut off, it still stands for election:
    # the lagging failover depends on it.
    "--cluster-replica-validity-factor", "0",
    # Replicas stay with the primary they were given, so roles change only by a fault.
    "--cluster-allow-replica-migration", "no",
    # A replica is synced as soon as it asks, not 5 s later in case others ask too.
    "--repl-diskless-sync-delay", "0",
)  # fmt: skip

Role = Literal["primary", "replica"]


@dataclass(frozen=True)
class ClusterNode:
    """One node as the cluster reports it now."""

    server: EmbeddedRedis
    node_id: str
    role: Role
    primary_id: str | None  # whose replica it is
    slots: tuple[range, ...]

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url


@dataclass(frozen=True)
class SlotMove:
    """What :meth:`ClusterHarness.migrate_slot` did, and how long it took."""

    slot: int
    source: EmbeddedRedis
    target: EmbeddedRedis
    keys: int
    batches: int
    move_s: float  # from IMPORTING to the last SETSLOT NODE
    settle_s: float  # from there until every node agrees


@dataclass(frozen=True)
class _Entry:
    """A line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    primary_id: str | None
    slots: tuple[range, ...]
    moving: bool  # a slot of its is being imported or migrated (shown to itself only)

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


def _parse_nodes(text: str) -> list[_Entry]:
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@", 1)[0]
        slots = []
        moving = False
        for item in fields[8:]:
            if item.startswith("["):
                moving = True
                continue
            first, _, last = item.partition("-")
            slots.append(range(int(first), int(last or first) + 1))
        entries.append(
            _Entry(
                node_id=fields[0],
                port=int(address.rsplit(":", 1)[1]),
                flags=frozenset(fields[2].split(",")),
                primary_id=None if fields[3] == "-" else fields[3],
                slots=tuple(slots),
                moving=moving,
            )
        )
    return entries


def _info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


# One node's map: who owns which slots, and which node replicates which.
_Map = tuple[tuple[tuple[int, int, str], ...], tuple[tuple[str, str], ...]]


class ClusterHarness:
    """``with ClusterHarness(primaries=3, replicas=1) as cluster: ... cluster.url ...``

    Nodes are the :class:`EmbeddedRedis` objects of :attr:`servers`: they keep
    their identity (port, node id) whatever role they play, so a test passes
    them to the faults and compares them with what :meth:`primary_for_slot` and
    :meth:`replica_of` answer. :attr:`timings` records how long each step took.
    """

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        timeout_s: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs a primary, and no replica count is negative")
        self.timeout_s = timeout_s
        # Short, so a killed primary is suspected after 1 s and replaced in about 2 s.
        args = ("--cluster-node-timeout", str(node_timeout_ms), *_NODE_ARGS, *extra_args)
        self._cluster = EmbeddedCluster(
            primaries, replicas_per_primary=replicas, extra_args=args, startup_timeout=timeout_s
        )
        # Replica j of primary i is servers[primaries + i * replicas + j], once started.
        self.servers: list[EmbeddedRedis] = []
        self._primaries, self._replicas = primaries, replicas
        self._ids: dict[int, str] = {}
        self._admins: dict[int, redis.Redis] = {}
        self._paused: set[int] = set()
        self.timings: list[tuple[str, float]] = []
        self.takeovers = 0  # lagging failovers that no election settled in time

    # -- lifecycle

    def start(self) -> Self:
        began = time.monotonic()
        try:
            self._form()
        except BaseException:
            self.close()
            raise
        self.timings.append(("start", time.monotonic() - began))
        return self

    def _form(self) -> None:
        self._cluster.start()
        self.servers = [*self._cluster.primaries, *self._cluster.replicas]
        for server in self.servers:
            self._ids[server.port] = self._text(server, "CLUSTER", "MYID")
        self.wait_ok()

    def close(self) -> None:
        for port in list(self._paused):
            self._signal(port, signal.SIGCONT)
        for admin in self._admins.values():
            with suppress(redis.RedisError, OSError):
                admin.close()
        self._admins.clear()
        for server in self.servers:
            # Throwaway data: a kill skips the shutdown's wait for lagging replicas.
            server.kill()
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what the cluster looks like now

    @property
    def running(self) -> list[EmbeddedRedis]:
        return [server for server in self.servers if server.running]

    @property
    def url(self) -> str:
        """One live node's URL: enough for a cluster client to find the rest."""
        return self._live()[0].url

    @property
    def seed_urls(self) -> list[str]:
        return [server.url for server in self._live()]

    def node_id(self, server: EmbeddedRedis) -> str:
        return self._ids[server.port]

    @property
    def nodes(self) -> list[ClusterNode]:
        """The live nodes and their roles, as a live node reports them."""
        by_port = {server.port: server for server in self.running}
        entries = _parse_nodes(self._text(self._live()[0], "CLUSTER", "NODES"))
        return [
            ClusterNode(
                server=by_port[entry.port],
                node_id=entry.node_id,
                role="replica" if "slave" in entry.flags else "primary",
                primary_id=entry.primary_id,
                slots=entry.slots,
            )
            for entry in entries
            if entry.port in by_port and not entry.failing
        ]

    @property
    def primaries(self) -> list[EmbeddedRedis]:
        return [node.server for node in self.nodes if node.role == "primary" and node.slots]

    def primary_for_slot(self, slot: int) -> EmbeddedRedis:
        for node in self.nodes:
            if node.role == "primary" and any(slot in share for share in node.slots):
                return node.server
        raise LookupError(f"no live primary owns slot {slot}")

    def replicas_of(self, primary: EmbeddedRedis) -> list[EmbeddedRedis]:
        wanted = self.node_id(primary)
        return [node.server for node in self.nodes if node.primary_id == wanted]

    def replica_of(self, primary: EmbeddedRedis) -> EmbeddedRedis:
        found = self.replicas_of(primary)
        if not found:
            raise LookupError(f"the node on port {primary.port} has no live replica")
        return found[0]

    def wait_ok(self, timeout_s: float | None = None) -> None:
        """Return once every live node says ok and reports the same owners and replicas.

        Also that every replica's link to its primary is up, and no slot is
        half moved: nothing is in transition.
        """
        self._settle(lambda _map: True, "the cluster to agree and be ok", timeout_s)

    # -- faults

    def failover(self, primary: EmbeddedRedis) -> EmbeddedRedis:
        """A graceful CLUSTER FAILOVER on the primary's replica; returns the new primary."""
        began = time.monotonic()
        replica = self.replica_of(primary)
        self._admin(replica).execute_command("CLUSTER", "FAILOVER")
        self._settle(self._swapped(primary, replica), "the replica to take over")
        self.timings.append(("failover", time.monotonic() - began))
        return replica

    def kill_primary(self, primary: EmbeddedRedis) -> EmbeddedRedis:
        """SIGKILL the primary; returns its replica once promoted and agreed on."""
        began = time.monotonic()
        candidates = self.replicas_of(primary)
        if not candidates:
            raise LookupError(f"the node on port {primary.port} has no replica to promote")
        primary.kill()
        promoted = self._settle_promotion(primary, candidates, takeover_after_s=None)
        self.timings.append(("kill_primary", time.monotonic() - began))
        return promoted

    def rejoin(self, node: EmbeddedRedis) -> EmbeddedRedis:
        """Restart a killed node; returns the primary it now replicates."""
        began = time.monotonic()
        node.start()
        me = self.node_id(node)

        def replicates(map_: _Map) -> bool:
            return any(replica == me for replica, _ in map_[1])

        map_ = self._settle(replicates, "the restarted node to rejoin as a replica")
        primary_id = dict(map_[1])[me]
        self.timings.append(("rejoin", time.monotonic() - began))
        return next(s for s in self.servers if self._ids[s.port] == primary_id)

    def lagging_failover(
        self, primary: EmbeddedRedis, during: Callable[[], object]
    ) -> EmbeddedRedis:
        """A failover onto replicas that missed what ``during()`` wrote to the primary.

        The replicas are caught up first (WAIT), then paused (SIGSTOP) and cut
        off by the primary, so no byte of ``during()``'s writes can sit in
        their sockets; then the primary is killed and the replicas resume. One
        is promoted by election, or by TAKEOVER if none wins soon. Returns it.
        """
        began = time.monotonic()
        candidates = self.replicas_of(primary)
        if not candidates:
            raise LookupError(f"the node on port {primary.port} has no replica to promote")
        admin = self._admin(primary)
        caught_up = admin.execute_command("WAIT", len(candidates), 5000)
        if caught_up != len(candidates):
            raise TimeoutError(f"{caught_up} of {len(candidates)} replicas caught up")
        for replica in candidates:
            self._signal(replica.port, signal.SIGSTOP)
        try:
            admin.execute_command("CLIENT", "KILL", "TYPE", "replica")
            self._until(
                lambda: self._replication(primary).get("connected_slaves") == 0,
                "the primary to drop its replicas",
            )
            during()
            primary.kill()
        finally:
            for replica in candidates:
                self._signal(replica.port, signal.SIGCONT)
        promoted = self._settle_promotion(primary, candidates, takeover_after_s=4.0)
        self.timings.append(("lagging_failover", time.monotonic() - began))
        return promoted

    def migrate_slot(
        self,
        slot: int,
        to_primary: EmbeddedRedis,
        *,
        between: Callable[[], object] | None = None,
        batch: int = 100,
    ) -> SlotMove:
        """Move a slot and its keys to another primary, as an operator's resharding does.

        ``between()`` runs once, after the first batch of keys has moved (or
        straight away for an empty slot), while the source answers ASK and
        TRYAGAIN for the slot.
        """
        source = self.primary_for_slot(slot)
        if source is to_primary:
            raise ValueError(f"slot {slot} is on the node on port {source.port} already")
        source_id, target_id = self.node_id(source), self.node_id(to_primary)
        began = time.monotonic()
        self._admin(to_primary).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self._admin(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = batches = 0
        pending = between
        while True:
            names = self._admin(source).execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if names:
                self._admin(source).execute_command(
                    "MIGRATE", "127.0.0.1", to_primary.port, "", 0, 5000, "KEYS", *names
                )
                keys, batches = keys + len(names), batches + 1
            if pending is not None:
                pending, run = None, pending
                run()
            if not names:
                break
        # The target first: told first, the source would send callers to a node
        # that does not claim the slot yet.
        others = [p for p in self.primaries if p is not source and p is not to_primary]
        for node in (to_primary, source, *others):
            self._admin(node).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        moved = time.monotonic()

        def owned(map_: _Map) -> bool:
            return any(a <= slot < b and owner == target_id for a, b, owner in map_[0])

        self._settle(owned, f"every node to see slot {slot} moved")
        done = time.monotonic()
        self.timings.append(("migrate_slot", done - began))
        return SlotMove(slot, source, to_primary, keys, batches, moved - began, done - moved)

    # -- internals

    def _admin(self, server: EmbeddedRedis) -> redis.Redis:
        admin = self._admins.get(server.port)
        if admin is None:
            admin = redis.Redis(port=server.port, socket_timeout=5, socket_connect_timeout=2)
            self._admins[server.port] = admin
        return admin

    def _text(self, server: EmbeddedRedis, *command: str) -> str:
        reply = self._admin(server).execute_command(*command)
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _replication(self, server: EmbeddedRedis) -> dict[str, object]:
        return dict(self._admin(server).info("replication"))

    def _live(self) -> list[EmbeddedRedis]:
        live = [s for s in self.running if s.port not in self._paused]
        if not live:
            raise LookupError("no node of the cluster is running")
        return live

    def _signal(self, port: int, signum: signal.Signals) -> None:
        server = next(s for s in self.servers if s.port == port)
        if server.pid is not None:
            os.kill(server.pid, signum)
        if signum == signal.SIGSTOP:
            self._paused.add(port)
        else:
            self._paused.discard(port)

    def _map_of(self, server: EmbeddedRedis) -> tuple[_Map | None, str]:
        """The node's map when it is ok and every live node is in it, healthy; else why not."""
        port = server.port
        if _info(self._text(server, "CLUSTER", "INFO")).get("cluster_state") != "ok":
            return None, f"{port}: cluster_state not ok"
        live = {self._ids[s.port] for s in self._live()}
        entries = {e.node_id: e for e in _parse_nodes(self._text(server, "CLUSTER", "NODES"))}
        for node_id in live:
            entry = entries.get(node_id)
            if entry is None or entry.failing:
                return None, f"{port}: sees {node_id[:8]} as {entry and sorted(entry.flags)}"
        owners = sorted((r.start, r.stop, e.node_id) for e in entries.values() for r in e.slots)
        if sum(b - a for a, b, _ in owners) != SLOTS or {o for _, _, o in owners} - live:
            return None, f"{port}: slots not all on live nodes: {owners}"
        replicas = sorted(
            (e.node_id, e.primary_id)
            for e in entries.values()
            if e.node_id in live and e.primary_id is not None
        )
        me = entries[self._ids[port]]
        if me.moving:
            return None, f"{port}: a slot move is under way"
        replica = "slave" in me.flags
        if replica and self._replication(server).get("master_link_status") != "up":
            return None, f"{port}: replication link not up"
        return (tuple(owners), tuple(replicas)), ""

    def _agreement(self) -> tuple[_Map | None, str]:
        maps = set()
        for server in self._live():
            try:
                map_, why = self._map_of(server)
            except (redis.RedisError, OSError) as exc:
                return None, f"{server.port}: {exc}"
            if map_ is None:
                return None, why
            maps.add(map_)
        if len(maps) != 1:
            return None, f"the nodes disagree: {sorted(maps)}"
        return maps.pop(), ""

    def _settle(
        self, expect: Callable[[_Map], bool], what: str, timeout_s: float | None = None
    ) -> _Map:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            map_, why = self._agreement()
            if map_ is not None and expect(map_):
                return map_
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited in vain for {what}: {why or map_}")
            time.sleep(0.02)

    def _until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited in vain for {what}")
            time.sleep(0.02)

    def _swapped(self, primary: EmbeddedRedis, replica: EmbeddedRedis) -> Callable[[_Map], bool]:
        old, new = self.node_id(primary), self.node_id(replica)

        def check(map_: _Map) -> bool:
            owners = {owner for _, _, owner in map_[0]}
            return new in owners and old not in owners and (old, new) in map_[1]

        return check

    def _settle_promotion(
        self,
        dead: EmbeddedRedis,
        candidates: list[EmbeddedRedis],
        takeover_after_s: float | None,
    ) -> EmbeddedRedis:
        ids = {self.node_id(c): c for c in candidates}
        winner: list[EmbeddedRedis] = []

        def promoted(map_: _Map) -> bool:
            winner[:] = [ids[o] for _, _, o in map_[0] if o in ids][:1]
            return bool(winner)

        if takeover_after_s is not None:
            try:
                self._settle(promoted, "a replica to win the election", takeover_after_s)
            except TimeoutError:
                self._admin(candidates[0]).execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
                self.takeovers += 1
            else:
                return winner[0]
        self._settle(promoted, f"a replica of the killed node on port {dead.port} to take over")
        return winner[0]


@contextmanager
def three_primaries(timeout_s: float = 20.0) -> Iterator[list[EmbeddedRedis]]:
    """Three primaries without replicas, a third of the slots each; stopped on exit.

    With the servers' default node timeout: with no replica to fail over to, a
    node that a busy machine starves for a second must not take its slots down.
    """
    with ClusterHarness(3, 0, node_timeout_ms=15000, timeout_s=timeout_s) as harness:
        yield harness.servers


# --- what moving a slot costs its callers --------------------------------------------------------

# One account's call, as a credit script makes it: read every key, write one.
_DEBIT = """
for i = 2, #KEYS do redis.call('GET', KEYS[i]) end
return redis.call('DECR', KEYS[1])
"""
_START_BALANCE = 1_000_000


@dataclass(frozen=True)
class SlotMoveCost:
    """What one moved slot cost the calls made on it while it moved."""

    accounts: int
    keys: int
    batch: int
    move_s: float  # from IMPORTING to the last SETSLOT NODE
    settle_s: float  # from there until every node agrees
    calls: int  # calls made from just before the move until every node agreed
    disturbed: int  # calls that met TRYAGAIN or ASK at least once
    tryagain: int  # TRYAGAIN replies
    ask: int  # ASK replies
    disturbed_s: float  # from the first TRYAGAIN or ASK to the last
    median_call_s: float
    worst_call_s: float  # the slowest call, its redirections and retries included
    applied: int  # the calls' writes found afterwards: ``calls`` when none was lost


def account_keys(tag: str, account: int, per_account: int = 4) -> list[str]:
    """The keys of one account under a partition's hash tag, so all sit in one slot."""
    return [f"{{{tag}}}:acct:{account}:k{field}" for field in range(per_account)]


class _Prober:
    """Calls the script on one account after another, following redirections by hand."""

    def __init__(self, ports: list[int], start: int, keys: list[list[str]], pause_s: float):
        self.clients = {port: redis.Redis(port=port, socket_timeout=5) for port in ports}
        self.owner, self.keys, self.pause_s = start, keys, pause_s
        self.stop = threading.Event()
        self.durations: list[float] = []
        self.disturbed = self.tryagain = self.ask = 0
        self.first_hit: float | None = None
        self.last_hit = 0.0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self._call(self.keys[len(self.durations) % len(self.keys)])
        except BaseException as exc:  # handed to the measuring thread
            self.failure = exc
        finally:
            for client in self.clients.values():
                client.close()

    def _hit(self) -> None:
        now = time.monotonic()
        self.first_hit = now if self.first_hit is None else self.first_hit
        self.last_hit = now

    def _call(self, keys: list[str]) -> None:
        began = time.monotonic()
        port, asking, met = self.owner, False, False
        while True:
            try:
                if asking:
                    pipe = self.clients[port].pipeline(transaction=False)
                    pipe.execute_command("ASKING")
                    pipe.eval(_DEBIT, len(keys), *keys)
                    pipe.execute()
                else:
                    self.clients[port].eval(_DEBIT, len(keys), *keys)
                break
            except MovedError as exc:  # before AskError: it is one
                port = self.owner = int(exc.port)
                asking = False
            except AskError as exc:
                self.ask, met = self.ask + 1, True
                port, asking = int(exc.port), True
                self._hit()
            except TryAgainError:
                self.tryagain, met = self.tryagain + 1, True
                self._hit()
                time.sleep(self.pause_s)
        self.durations.append(time.monotonic() - began)
        self.disturbed += met


def measure_slot_move(
    harness: ClusterHarness,
    *,
    accounts: int = 500,
    keys_per_account: int = 4,
    tag: str = "rc:v1:p7",
    batch: int = 100,
    retry_pause_s: float = 0.001,
) -> SlotMoveCost:
    """Move the slot of ``tag`` (``accounts`` accounts of ``keys_per_account`` keys) while a caller uses it.

    One caller makes multi-key script calls on the slot's accounts from just
    before the move until every node agrees on the new owner, retrying
    TRYAGAIN after ``retry_pause_s`` and following ASK and MOVED by hand.
    """
    slot = key_slot(f"{{{tag}}}".encode())
    source = harness.primary_for_slot(slot)
    target = next(p for p in harness.primaries if p is not source)
    keys = [account_keys(tag, account, keys_per_account) for account in range(accounts)]
    with redis.Redis(port=source.port) as client, client.pipeline(transaction=False) as pipe:
        for names in keys:
            pipe.set(names[0], _START_BALANCE)
            for name in names[1:]:
                pipe.set(name, "x" * 32)
        pipe.execute()
    prober = _Prober([s.port for s in harness.primaries], source.port, keys, retry_pause_s)
    thread = threading.Thread(target=prober.run, name="slot-move-prober", daemon=True)
    thread.start()
    try:
        time.sleep(0.05)  # calls under way before the move begins
        move = harness.migrate_slot(slot, target, batch=batch)
    finally:
        prober.stop.set()
        thread.join(30)
    if prober.failure is not None:
        raise prober.failure
    with redis.Redis(port=target.port) as client, client.pipeline(transaction=False) as pipe:
        for names in keys:
            pipe.get(names[0])
        balances = pipe.execute()
    durations = sorted(prober.durations)
    return SlotMoveCost(
        accounts=accounts,
        keys=move.keys,
        batch=batch,
        move_s=move.move_s,
        settle_s=move.settle_s,
        calls=len(durations),
        disturbed=prober.disturbed,
        tryagain=prober.tryagain,
        ask=prober.ask,
        disturbed_s=prober.last_hit - prober.first_hit if prober.first_hit is not None else 0.0,
        median_call_s=durations[len(durations) // 2] if durations else 0.0,
        worst_call_s=durations[-1] if durations else 0.0,
        applied=sum(_START_BALANCE - int(balance) for balance in balances),
    )


# -- small pieces for tests that build their own cluster from three_primaries()


@contextmanager
def replica_of(primary: EmbeddedRedis, timeout_s: float = 20.0) -> Iterator[EmbeddedRedis]:
    """A cluster node that replicates ``primary``, in sync when yielded; stopped on exit."""
    with EmbeddedRedis(cluster=True, cluster_slots=range(0)) as replica:
        with redis.Redis(port=replica.port) as node, redis.Redis(port=primary.port) as source:
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
            while node.info("replication").get("master_link_status") != "up" or not _cluster_ok(
                node, 4
            ):
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


def _cluster_ok(client: redis.Redis, nodes: int) -> bool:
    info = client.cluster("INFO")
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == nodes
