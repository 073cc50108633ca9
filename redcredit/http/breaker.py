"""Deciding fast while Redis is down: a circuit breaker and a deadline for one call.

A gate in front of an API must answer on a Redis outage within a short,
stated deadline, never after a socket timeout (a rate limiter that makes every
request wait seconds takes the site down as surely as one that answers 500).
:func:`within_deadline` bounds one call; :class:`CircuitBreaker` stops calling
at all after repeated failures, so the answer is immediate, and lets one probe
through now and then to notice the recovery.

The breaker does no I/O and reads time only from the clock it is given.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from ..errors import BackendUnavailable

__all__ = ["BreakerState", "CircuitBreaker", "within_deadline"]

T = TypeVar("T")

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed; open after ``failure_threshold`` failures in a row; half-open after a cool-down.

    Ask :meth:`allow` before a call and report its outcome with
    :meth:`record_success` or :meth:`record_failure`. While open, :meth:`allow`
    says no at once. Once the cool-down has passed, one caller at a time is
    let through as a probe: its success closes the breaker, its failure opens
    it for another cool-down. A probe that never reports (its task was
    cancelled) stops blocking others after another ``reset_timeout`` seconds.

    Meant for one event loop (or one thread): it takes no lock.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int):
            raise TypeError("failure_threshold must be an int")
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not math.isfinite(reset_timeout) or reset_timeout <= 0:
            raise ValueError("reset_timeout must be a positive number of seconds")
        self.failure_threshold = failure_threshold
        self.reset_timeout = float(reset_timeout)
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_started: float | None = None

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self.reset_timeout:
            return "open"
        return "half_open"

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until the next probe may go through (0 when calls go through now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout - self._clock())

    def allow(self) -> bool:
        """Whether a call may go to the backend now; a yes in half-open state is the probe."""
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self.reset_timeout:
            return False
        if self._probe_started is not None and now - self._probe_started < self.reset_timeout:
            return False
        self._probe_started = now
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probe_started = None

    def record_failure(self) -> None:
        self._failures += 1
        # A failed probe re-opens at once, whatever the count: the backend is still down.
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._probe_started = None

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self.state!r}, failures={self._failures}, "
            f"threshold={self.failure_threshold}, reset_timeout={self.reset_timeout})"
        )


async def within_deadline(awaitable: Awaitable[T], deadline_s: float) -> T:
    """``await awaitable``, or :class:`BackendUnavailable` once ``deadline_s`` seconds have passed.

    The call is cancelled at the deadline. A write cut off that way may or may
    not have been applied, like any timed-out call: retry it with the same
    idempotency key to learn which.
    """
    if not math.isfinite(deadline_s) or deadline_s <= 0:
        if inspect.iscoroutine(awaitable):
            # Never awaited otherwise, and Python would warn about it.
            awaitable.close()
        raise ValueError("deadline_s must be a positive number of seconds")
    timeout = asyncio.timeout(deadline_s)
    try:
        async with timeout:
            return await awaitable
    except TimeoutError as exc:
        # A TimeoutError raised by the call itself is not the deadline: only
        # an expired deadline is reported as one.
        if not timeout.expired():
            raise
        raise BackendUnavailable(
            f"Redis did not answer within the {deadline_s * 1000:.0f} ms deadline"
        ) from exc
