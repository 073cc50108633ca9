"""Clients under traffic while a real cluster (3 primaries + 3 replicas) fails over or reshards.

Every caller retries a failed call with its idempotency key, as the README
asks. The checks: no call applied twice, none lost — except, in a failover
onto replicas that missed the last writes, the acknowledged calls of that
window, which are counted and must have come from the lost primary's slots.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from redcredit import AsyncRedCredit, BackendUnavailable, RedCreditError, Settings
from redcredit.backends.slots import slot_of
from redcredit.core.keys import KeySpace
from redcredit.servers.redis import EmbeddedRedis
from tests.support.cluster import ClusterHarness

ACCOUNTS = [f"f-{n}" for n in range(48)]
START = 1_000_000


@dataclass
class Load:
    client: AsyncRedCredit
    acknowledged: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # tries that failed, by error type
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0

    async def worker(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            account = ACCOUNTS[(index * 7 + n) % len(ACCOUNTS)]
            key = f"{index}-{n}"
            n += 1
            until = time.monotonic() + 15
            while True:
                try:
                    await self.client.spend(account, cost=1, idempotency_key=key)
                    break
                except (BackendUnavailable, RedCreditError) as exc:
                    self.failures[type(exc).__name__] += 1
                    if time.monotonic() > until:
                        raise
                    await asyncio.sleep(0.05)
            self.acknowledged[account] += 1
            self.calls += 1


async def _under_load(  # type: ignore[no-untyped-def]
    cluster: ClusterHarness, fault, callers: int = 32, durability: str = "none"
) -> Load:
    settings = Settings(
        redis_url=cluster.url, free_credits=START, key_prefix="faults", durability=durability
    )
    async with AsyncRedCredit(settings=settings) as client:
        await client.ready()
        load = Load(client)
        workers = [asyncio.create_task(load.worker(i)) for i in range(callers)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(fault)
        await asyncio.sleep(0.3)
        load.stop.set()
        await asyncio.gather(*workers)
        load.balances = {  # type: ignore[attr-defined]
            a: (await client.balance(a)).credits for a in ACCOUNTS
        }
    return load


def _missing(load: Load) -> dict[str, int]:
    """Acknowledged spends that the cluster does not have, by account (negative: doubled)."""
    out = {}
    for account in ACCOUNTS:
        expected = START - load.acknowledged[account]
        actual = load.balances[account]  # type: ignore[attr-defined]
        if actual != expected:
            out[account] = actual - expected
    return out


def _primary_of(cluster: ClusterHarness, account: str) -> EmbeddedRedis:
    keys = KeySpace("faults:v1", 64)
    return cluster.primary_for_slot(slot_of(keys.journal(keys.partition(account))))


async def test_a_graceful_failover_under_load_loses_and_doubles_nothing(
    cluster_harness: ClusterHarness,
) -> None:
    victim = cluster_harness.primaries[0]
    load = await _under_load(cluster_harness, lambda: cluster_harness.failover(victim))
    assert load.calls > 500
    assert _missing(load) == {}


async def test_a_killed_primary_under_load_doubles_nothing(
    cluster_harness: ClusterHarness,
) -> None:
    victim = cluster_harness.primaries[1]
    served_by_victim = {a for a in ACCOUNTS if _primary_of(cluster_harness, a) is victim}
    load = await _under_load(cluster_harness, lambda: cluster_harness.kill_primary(victim))
    missing = _missing(load)
    print(f"killed primary: {sum(load.failures.values())} tries failed, {load.calls} applied, "
          f"{sum(missing.values())} acknowledged lost")  # fmt: skip
    # Replication is asynchronous: what the replica had not yet received when
    # its primary died is lost (on loopback, usually nothing). Never doubled,
    # and never on another primary's accounts.
    assert all(delta > 0 for delta in missing.values())
    assert set(missing) <= served_by_victim
    # Calls to the dead primary's slots failed until its replica took over,
    # and were retried with their keys.
    assert set(load.failures) <= {"BackendUnavailable", "RedisRefused"}


async def test_a_slot_moved_under_load_costs_no_caller_an_error(
    cluster_harness: ClusterHarness,
) -> None:
    keys = KeySpace("faults:v1", 64)
    slot = slot_of(keys.journal(keys.partition(ACCOUNTS[0])))

    def move() -> None:
        source = cluster_harness.primary_for_slot(slot)
        target = next(p for p in cluster_harness.primaries if p is not source)
        cluster_harness.migrate_slot(slot, target, batch=2, between=lambda: time.sleep(0.2))

    load = await _under_load(cluster_harness, move)
    assert _missing(load) == {}
    assert load.failures == Counter()  # TRYAGAIN and ASK were all followed within the deadline


async def test_a_failover_onto_a_lagging_replica_loses_only_its_window(
    cluster_harness: ClusterHarness,
) -> None:
    victim = cluster_harness.primaries[2]
    served_by_victim = {a for a in ACCOUNTS if _primary_of(cluster_harness, a) is victim}

    def fault() -> None:
        cluster_harness.lagging_failover(victim, during=lambda: time.sleep(0.3))

    load = await _under_load(cluster_harness, fault)
    missing = _missing(load)
    print(f"lagging failover: {sum(missing.values())} acknowledged spends lost of {load.calls}")
    # Only acknowledged spends vanish (a balance above what was acknowledged),
    # none is doubled, and only on accounts the killed primary served.
    assert all(delta > 0 for delta in missing.values())
    assert set(missing) <= served_by_victim
    assert sum(missing.values()) > 0  # the window was real


async def test_with_durability_replica_a_lagging_failover_loses_no_acknowledged_call(
    cluster_harness: ClusterHarness,
) -> None:
    """WAIT after each change: a change no replica confirmed is never acknowledged."""
    victim = cluster_harness.primaries[0]

    def fault() -> None:
        cluster_harness.lagging_failover(victim, during=lambda: time.sleep(0.3))
        # The promoted replica has no replica of its own until the old primary returns as one.
        cluster_harness.rejoin(victim)

    load = await _under_load(cluster_harness, fault, durability="replica")
    assert load.calls > 100
    # Calls waiting for the cut-off replica failed (never acknowledged) and were retried.
    assert sum(load.failures.values()) > 0
    assert _missing(load) == {}
