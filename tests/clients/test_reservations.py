"""Reservations: holds with a lease, settled, released, renewed, or lapsing by themselves."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis

from redcredit import (
    AsyncRedCredit,
    InsufficientCredits,
    InvalidInput,
    RedCredit,
    ReservationClosed,
    ReservationLapsed,
    ReservationNotFound,
    ReservationRef,
    Settings,
)
from redcredit.http.asgi import CreditGate
from redcredit.http.routes import Message, Route, Scope
from redcredit.servers.redis import EmbeddedRedis
from tests.support.helpers import account_entries


def test_hold_counts_against_available(rc: RedCredit) -> None:
    reservation = rc.reserve("al", 60, ttl=30)
    assert len(reservation.id) == 32 and reservation.amount == 60
    balance = rc.balance("al")
    assert (balance.credits, balance.held, balance.available) == (100, 60, 40)
    assert reservation.deadline_ms - balance.server_time_ms in range(29_000, 30_001)
    with pytest.raises(InsufficientCredits) as refused:
        rc.spend("al", cost=41)
    assert refused.value.available == 40
    with pytest.raises(InsufficientCredits):
        rc.reserve("al", 41)


@pytest.mark.parametrize(
    ("actual", "charged", "uncharged", "credits"),
    [(10, 10, 0, 90), (50, 50, 0, 50), (70, 70, 0, 30), (130, 100, 30, 0)],
)
def test_settle_less_equal_more(
    rc: RedCredit, actual: int, charged: int, uncharged: int, credits: int
) -> None:
    reservation = rc.reserve("bo", 50)
    settlement = rc.settle(reservation, actual)
    assert settlement.outcome == "settled"
    assert (settlement.charged, settlement.uncharged) == (charged, uncharged)
    assert settlement.credits_remaining == credits
    balance = rc.balance("bo")
    assert (balance.credits, balance.held) == (credits, 0)


def test_settle_above_hold_never_takes_other_holds(rc: RedCredit) -> None:
    first = rc.reserve("cy", 50)
    second = rc.reserve("cy", 40)
    settlement = rc.settle(first, 80)
    # 10 credits are free besides the two holds; the second hold stays whole.
    assert (settlement.charged, settlement.uncharged) == (60, 20)
    assert rc.balance("cy").available == 0
    assert rc.settle(second, 40).credits_remaining == 0


def test_release_and_double_close(rc: RedCredit, redis_client, prefix: str) -> None:
    reservation = rc.reserve("di", 70, ttl=30)
    record = rc.engine.keys.for_account("di").reservation(reservation.id)
    # Nobody may ever touch the record again: Redis frees it by itself.
    assert 30_000 < redis_client.pttl(record) <= 30_000 + 3_600_000
    released = rc.release(reservation)
    assert (released.outcome, released.charged) == ("released", 0)
    assert rc.balance("di").available == 100
    again = rc.release(reservation)
    assert again.replayed and again.outcome == "released"
    # Settling after a release returns the first outcome and charges nothing.
    late = rc.settle(reservation, 70)
    assert (late.outcome, late.charged, late.replayed) == ("released", 0, True)
    assert rc.balance("di").credits == 100
    ops = [e["op"] for e in account_entries(redis_client, prefix, "di")]
    assert ops == ["open", "reserve", "release"]
    assert 0 < redis_client.pttl(record) <= 3_600_000


def test_double_settle_returns_first_outcome(rc: RedCredit) -> None:
    reservation = rc.reserve("ed", 30)
    first = rc.settle(reservation, 20)
    second = rc.settle(ReservationRef("ed", reservation.id), 5)
    assert second.replayed and (second.charged, second.sequence) == (20, first.sequence)
    assert rc.balance("ed").credits == 80


def test_lapsed_hold_stops_counting_at_its_deadline(rc: RedCredit, redis_client, prefix) -> None:
    reservation = rc.reserve("flo", 90, ttl=10)
    rc.engine.clock_offset_ms = 9_000  # real time passes too: leave it a margin
    assert rc.balance("flo").available == 10
    rc.engine.clock_offset_ms = 10_000
    assert rc.balance("flo").available == 100
    with pytest.raises(ReservationLapsed):
        rc.settle(reservation, 50)
    with pytest.raises(ReservationLapsed):
        rc.extend(reservation)
    late = rc.settle(reservation, 50, allow_late=True)
    assert (late.outcome, late.charged) == ("settled_late", 50)
    assert rc.balance("flo").credits == 50
    ops = [e["op"] for e in account_entries(redis_client, prefix, "flo")]
    assert ops == ["open", "reserve", "lapse", "settle"]


def test_extend_moves_the_deadline(rc: RedCredit) -> None:
    reservation = rc.reserve("gus", 50, ttl=10)
    rc.engine.clock_offset_ms = 8_000
    extended = rc.extend(reservation, ttl=10)
    assert extended.deadline_ms - reservation.deadline_ms in range(7_900, 8_100)
    rc.engine.clock_offset_ms = 12_000
    assert rc.balance("gus").held == 50
    assert rc.settle(extended, 50).outcome == "settled"
    with pytest.raises(ReservationClosed):
        rc.extend(extended)


def test_unknown_reservation(rc: RedCredit) -> None:
    with pytest.raises(ReservationNotFound):
        rc.settle(ReservationRef("hal", "0" * 32), 1)
    with pytest.raises(InvalidInput):
        rc.settle(ReservationRef("hal", "not-an-id"), 1)


def test_ttl_bounds(rc: RedCredit) -> None:
    for ttl in (0, -1, 10**9, 1.5, True):
        with pytest.raises(InvalidInput):
            rc.reserve("ida", 1, ttl=ttl)  # type: ignore[arg-type]


def test_paid_reservation_records_usage(rc: RedCredit) -> None:
    rc.set_plan("joe", "paid")
    reservation = rc.reserve("joe", 10_000)
    assert rc.balance("joe").held == 0
    settlement = rc.settle(reservation, 12_345)
    assert (settlement.charged, settlement.credits_remaining) == (12_345, None)
    assert rc.balance("joe").credits == 100


def test_block_settles_reported_cost(rc: RedCredit) -> None:
    with rc.reservation("kim", 50) as lease:
        assert rc.balance("kim").held == 50
        lease.add(12)
        lease.add(3)
    assert lease.settlement is not None and lease.settlement.charged == 15
    assert rc.balance("kim").credits == 85


def test_block_settles_whole_hold_when_nothing_reported(rc: RedCredit) -> None:
    with rc.reservation("lou", 50) as lease:
        pass
    assert lease.settlement is not None and lease.settlement.charged == 50


def test_block_releases_and_reraises(rc: RedCredit) -> None:
    with pytest.raises(RuntimeError, match="model failed"), rc.reservation("max", 50) as lease:
        lease.add(10)
        raise RuntimeError("model failed")
    assert lease.settlement is not None and lease.settlement.outcome == "released"
    balance = rc.balance("max")
    assert (balance.credits, balance.held) == (100, 0)


def test_block_renews_its_lease(rc: RedCredit) -> None:
    with rc.reservation("ned", 50, ttl=1) as lease:
        time.sleep(2.5)
        assert rc.balance("ned").held == 50
        lease.set_actual(7)
    assert lease.settlement is not None
    assert (lease.settlement.outcome, lease.settlement.charged) == ("settled", 7)


async def test_async_block(arc: AsyncRedCredit) -> None:
    async with arc.reservation("ola", 50, ttl=1) as lease:
        await asyncio.sleep(2.5)
        assert (await arc.balance("ola")).held == 50
        lease.add(20)
    assert lease.settlement is not None and lease.settlement.charged == 20
    with pytest.raises(ValueError, match="boom"):
        async with arc.reservation("ola", 50):
            raise ValueError("boom")
    assert (await arc.balance("ola")).credits == 80


async def test_async_block_keeps_a_cancellation_that_comes_while_it_exits(
    arc: AsyncRedCredit,
) -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(asyncio.CancelledError):
        async with arc.reservation("uma", 50, ttl=5) as lease:
            # Lands while the block waits for its renewer to stop.
            asyncio.get_running_loop().call_soon(task.cancel)
    task.uncancel()
    assert lease.settlement is None
    await arc.release(lease.reservation)


# --- the renewal policy, the same for every holder -----------------------------------------------

LEASE_S = 1


def _outage(server: EmbeddedRedis) -> None:
    """Redis out of memory, then hung past the lease's deadline, then healthy again."""
    control = redis.Redis.from_url(server.url)
    try:
        time.sleep(LEASE_S / 2)
        control.config_set("maxmemory", 1)
        time.sleep(LEASE_S / 2)
        control.config_set("maxmemory", 0)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            time.sleep(LEASE_S * 1.5)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        # A loop still renewing would try again every third of the lease.
        time.sleep(LEASE_S)
    finally:
        control.close()


def _sync_block(settings: Settings, server: EmbeddedRedis) -> None:
    with RedCredit(settings=settings) as client, client.reservation("rho", 10, ttl=LEASE_S):
        _outage(server)


async def _async_block(settings: Settings, server: EmbeddedRedis) -> None:
    async with (
        AsyncRedCredit(settings=settings) as client,
        client.reservation("rho", 10, ttl=LEASE_S),
    ):
        await asyncio.to_thread(_outage, server)


async def _gated_stream(settings: Settings, server: EmbeddedRedis) -> None:
    sent: list[Message] = []

    async def endpoint(scope: Scope, receive: Any, send: Any) -> None:
        await asyncio.to_thread(_outage, server)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    async with AsyncRedCredit(settings=settings) as client:
        route = Route("POST", "/s", stream=True, max_cost=10, messages=0, stream_ttl=LEASE_S)
        gate = CreditGate(
            endpoint, client=client, identify=lambda scope: "rho", routes=[route], deadline_s=5
        )
        await gate({"type": "http", "method": "POST", "path": "/s", "headers": []}, receive, send)
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("holder", [_sync_block, _async_block, _gated_stream])
async def test_every_holder_retries_an_outage_and_stops_at_a_lapse(
    holder: Callable[[Settings, EmbeddedRedis], Any],
    settings: Settings,
    redis_factory: Callable[..., EmbeddedRedis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = redis_factory()
    own = settings.model_copy(
        update={
            "redis_url": server.url,
            "redis_socket_timeout": timedelta(seconds=0.2),
            "redis_connect_timeout": timedelta(seconds=0.2),
        }
    )
    caplog.set_level(logging.WARNING, logger="redcredit")
    outcome = holder(own, server)
    if asyncio.iscoroutine(outcome):
        await outcome
    renewals = [r.getMessage() for r in caplog.records if "renew" in r.getMessage()]
    retried = [message for message in renewals if "will retry" in message]
    # Out of memory and hung: both outages, both retried.
    assert any("maxmemory" in message for message in retried), renewals
    assert any("did not answer" in message for message in retried), renewals
    # The lapse ends the loop: said once, and nothing tried after it.
    assert "can no longer be renewed" in renewals[-1] and "lapsed" in renewals[-1], renewals
    assert sum("can no longer" in message for message in renewals) == 1, renewals


HOLDER = textwrap.dedent(
    """
    import sys, time
    from redcredit import RedCredit, Settings
    settings = Settings.model_validate_json(sys.argv[1])
    client = RedCredit(settings=settings)
    with client.reservation("pia", 80, ttl=2) as lease:
        print(lease.reservation.deadline_ms, flush=True)
        time.sleep(60)
    """
)


def test_killed_holder_lapses_by_itself(rc: RedCredit, settings: Settings) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, settings.model_dump_json(context={"reveal_secrets": True})],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        int(holder.stdout.readline())
        time.sleep(3)  # past the first deadline: the block renews while the process lives
        assert rc.balance("pia").held == 80
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        killed_at = rc.balance("pia")
        # Renewed every 2/3 s with a 2 s lease, so at least ~1.3 s remain.
        assert killed_at.held == 80
        # No process of ours runs from here on; the lease ends on its own,
        # no later than 2 s after the last renewal.
        while (balance := rc.balance("pia")).held:
            assert balance.server_time_ms <= killed_at.server_time_ms + 2_000
            time.sleep(0.05)
        assert balance.available == 100
        assert balance.server_time_ms - killed_at.server_time_ms >= 1_000
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
