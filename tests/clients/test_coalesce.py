"""The async client's automatic pipelining: fewer round trips, the same results."""

from __future__ import annotations

import asyncio

import pytest

from redcredit import AsyncRedCredit, InsufficientCredits, Settings


async def test_concurrent_calls_share_round_trips(arc: AsyncRedCredit) -> None:
    await arc.grant("shared-trip", 900)
    (coalescer,) = arc.topology.coalescers.values()  # one server: one node
    before_trips, before_calls = coalescer.round_trips, coalescer.calls
    results = await asyncio.gather(*(arc.spend("shared-trip", cost=1) for _ in range(200)))
    trips = coalescer.round_trips - before_trips
    assert coalescer.calls - before_calls == 200
    assert trips < 50  # most calls rode along with others
    # Every caller got its own reply, in a consistent order of the balance.
    assert sorted(r.credits_remaining for r in results) == list(range(800, 1000))


async def test_refusals_and_successes_in_one_batch(arc: AsyncRedCredit) -> None:
    async def attempt(cost: int) -> int | str:
        try:
            result = await arc.spend("mixed", cost=cost)
        except InsufficientCredits:
            return "refused"
        assert result.credits_remaining is not None
        return cost

    outcomes = await asyncio.gather(*(attempt(c) for c in [60, 60, 30, 20, 200]))
    assert outcomes.count("refused") >= 2
    spent = sum(o for o in outcomes if isinstance(o, int))
    assert (await arc.balance("mixed")).credits == 100 - spent


async def test_a_cancelled_caller_does_not_disturb_the_others(arc: AsyncRedCredit) -> None:
    tasks = [asyncio.create_task(arc.spend("calm", cost=1)) for _ in range(20)]
    tasks[3].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    assert all(not isinstance(d, BaseException) for i, d in enumerate(done) if i != 3)
    # The cancelled call may or may not have reached Redis before it was cancelled.
    assert (await arc.balance("calm")).credits in (80, 81)


async def test_coalescing_can_be_turned_off(settings: Settings) -> None:
    plain = settings.model_copy(update={"pipeline_max_batch": 1})
    async with AsyncRedCredit(settings=plain) as client:
        results = await asyncio.gather(*(client.spend("solo", cost=1) for _ in range(10)))
        assert not client.topology.coalescers
    assert sorted(r.credits_remaining for r in results) == list(range(90, 100))


@pytest.mark.parametrize("callers", [1, 64])
async def test_backend_failure_reaches_every_caller(redis_factory, settings: Settings,
                                                    callers: int) -> None:  # fmt: skip
    server = redis_factory()
    async with AsyncRedCredit(settings=settings.model_copy(update={"redis_url": server.url})) as c:
        await c.spend("down", cost=1)
        server.stop()
        outcomes = await asyncio.gather(
            *(c.spend("down", cost=1) for _ in range(callers)), return_exceptions=True
        )
    assert all(type(o).__name__ == "BackendUnavailable" for o in outcomes)
