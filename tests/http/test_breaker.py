"""The circuit breaker and the decision deadline, without any server."""

from __future__ import annotations

import asyncio
import time

import pytest

from redcredit import BackendUnavailable
from redcredit.http.breaker import CircuitBreaker, within_deadline


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_opens_after_threshold_failures_in_a_row(clock: Clock) -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    # A success in between starts the count again.
    breaker.record_success()
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.retry_after() == 5


def test_half_open_lets_one_probe_through(clock: Clock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    breaker.record_failure()
    clock.now += 4.9
    assert not breaker.allow()
    assert breaker.retry_after() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert breaker.retry_after() == 0
    assert breaker.allow()
    # Everyone else waits for the probe's outcome.
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.consecutive_failures == 0


def test_failed_probe_opens_for_another_cool_down(clock: Clock) -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=5, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    # One failure is enough now: the probe showed the backend is still down.
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.retry_after() == 5
    clock.now += 5
    assert breaker.allow()


def test_lost_probe_stops_blocking_after_a_cool_down(clock: Clock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=2, clock=clock)
    breaker.record_failure()
    clock.now += 2
    assert breaker.allow()
    # The probe's task was cancelled and never reported.
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_uses_the_real_monotonic_clock_by_default() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.05)
    breaker.record_failure()
    assert not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"failure_threshold": 0}, ValueError),
        ({"failure_threshold": True}, TypeError),
        ({"failure_threshold": 2.0}, TypeError),
        ({"reset_timeout": 0}, ValueError),
        ({"reset_timeout": float("nan")}, ValueError),
        ({"reset_timeout": float("inf")}, ValueError),
    ],
)
def test_bad_settings_are_refused(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        CircuitBreaker(**options)  # type: ignore[arg-type]


async def test_within_deadline_returns_in_time() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 7

    assert await within_deadline(quick(), 1) == 7


async def test_within_deadline_turns_a_timeout_into_backend_unavailable() -> None:
    cancelled = asyncio.Event()

    async def hung() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.perf_counter()
    with pytest.raises(BackendUnavailable, match="50 ms"):
        await within_deadline(hung(), 0.05)
    assert time.perf_counter() - started < 0.5
    # The call itself was cancelled, not left running.
    assert cancelled.is_set()


async def test_within_deadline_keeps_the_calls_own_errors() -> None:
    async def fails() -> None:
        raise TimeoutError("the call's own timeout")

    with pytest.raises(TimeoutError, match="own timeout"):
        await within_deadline(fails(), 1)


async def test_within_deadline_refuses_a_bad_deadline_without_leaking_the_call() -> None:
    async def never() -> None:
        raise AssertionError("must not run")

    for deadline in (0, -1, float("nan")):
        # An un-awaited coroutine would warn, and warnings are errors here.
        with pytest.raises(ValueError, match="deadline_s"):
            await within_deadline(never(), deadline)
