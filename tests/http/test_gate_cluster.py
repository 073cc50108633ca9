"""The HTTP gate on a real Redis Cluster: charges on every node, and a killed primary met by policy."""

from __future__ import annotations

import asyncio
from collections import Counter

from redcredit import AsyncRedCredit, Settings
from redcredit.backends.slots import slot_of
from redcredit.core.keys import KeySpace
from tests.http.test_asgi import as_account, build_gate
from tests.support.asgi_support import ServedApp, eventually, http
from tests.support.cluster import ClusterHarness

ACCOUNTS = [f"gate-{n}" for n in range(24)]


async def test_the_gate_charges_accounts_on_every_primary(
    three_primary_cluster_url: str, settings: Settings
) -> None:
    own = settings.model_copy(update={"redis_url": three_primary_cluster_url})
    with ServedApp(own, build_gate) as served:
        # The gate asked at the server's startup: the first request finds the map read.
        assert served.app.client.topology.is_cluster is True
        async with http(served.url) as client:
            replies = [await client.post("/chat", headers=as_account(a)) for a in ACCOUNTS]
    assert [r.status_code for r in replies] == [200] * len(ACCOUNTS)
    async with AsyncRedCredit(settings=own) as rc:
        balances = [await rc.balance(a) for a in ACCOUNTS]
        owners = {
            (await rc.topology.slot_map()).owner(slot_of(rc.engine.keys.for_account(a).hash))
            for a in ACCOUNTS
        }
    assert len(owners) == 3
    assert {(b.credits, b.chat_messages) for b in balances} == {(97, 9)}


async def test_a_killed_primary_is_answered_by_each_route_policy_never_500(
    cluster_harness: ClusterHarness, settings: Settings
) -> None:
    own = settings.model_copy(update={"redis_url": cluster_harness.url, "key_prefix": "gate"})
    keys = KeySpace("gate:v1", own.partitions)
    victim = cluster_harness.primaries[0]
    on_victim = [
        a
        for a in ACCOUNTS
        if cluster_harness.primary_for_slot(slot_of(keys.for_account(a).hash)) is victim
    ]
    assert on_victim
    statuses: dict[str, Counter[int]] = {"/closed": Counter(), "/open": Counter()}
    with ServedApp(own, build_gate) as served:
        async with http(served.url) as client:
            for path in statuses:
                assert (
                    await client.post(path, headers=as_account(on_victim[0]))
                ).status_code == 200
            stop = asyncio.Event()

            async def hammer(path: str) -> None:
                while not stop.is_set():
                    for account in on_victim:
                        reply = await client.post(path, headers=as_account(account))
                        statuses[path][reply.status_code] += 1

            load = [asyncio.create_task(hammer(p)) for p in statuses]
            await asyncio.to_thread(cluster_harness.kill_primary, victim)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*load)
            # The replica took over: once the gate's breaker lets calls through, it charges again.

            async def charging() -> bool:
                reply = await client.post("/closed", headers=as_account(on_victim[0]))
                return reply.status_code == 200

            await eventually(charging, within=10)
    assert set(statuses["/closed"]) <= {200, 503} and statuses["/closed"][503] > 0
    assert set(statuses["/open"]) == {200}  # let through while Redis was out of reach
