"""Automatic pipelining for the async client: concurrent calls share round trips.

A call made while no round trip is under way goes out at once (no added
wait); calls made while round trips are under way queue up and go out
together in the next one, up to ``max_batch`` calls per pipeline and
``max_in_flight`` pipelines at a time. Each caller still waits for its own
reply, so the latency it sees is honest.

One Redis connection carries many calls this way, and Python pays for a
round trip once per batch instead of once per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ..core.engine import ScriptCall

__all__ = ["Coalescer", "Send"]

# One round trip for the calls given, to one node: a reply per call, error
# replies as exception objects (see backends/channel.py).
Send = Callable[[list[ScriptCall]], Awaitable[list[Any]]]


class Coalescer:
    """Batches the calls for one node; replies are handed back as they came."""

    def __init__(self, send: Send, *, max_batch: int = 128, max_in_flight: int = 4) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._senders: set[asyncio.Task[None]] = set()
        # Round trips made and calls they carried, for tests and metrics.
        self.round_trips = 0
        self.calls = 0

    async def run(self, call: ScriptCall) -> Any:
        """The call's reply (an error reply as an exception object, not raised)."""
        if not self._queue and self._in_flight < self._max_in_flight:
            # Nothing waiting: this call goes out at once, from the caller's own
            # task, so cancelling the caller cancels nobody else's call.
            self._in_flight += 1
            try:
                self.round_trips += 1
                self.calls += 1
                return (await self._send([call]))[0]
            finally:
                self._in_flight -= 1
                self._hand_off()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        self._hand_off()
        return await future

    def _hand_off(self) -> None:
        # Queued calls go out from a task of their own: no caller sends other
        # callers' batches, and a cancelled caller cannot cut a shared one short.
        if self._queue and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            sender = asyncio.create_task(self._drain())
            # Keep a reference: the event loop only holds tasks weakly.
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._execute(batch)
        finally:
            self._in_flight -= 1

    async def _execute(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        try:
            replies = await self._send([call for call, _ in batch])
        except BaseException as exc:
            # The connection failed: every call of the batch shares the outcome.
            for _call, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_call, future), reply in zip(batch, replies, strict=True):
            if not future.done():  # else the caller was cancelled
                future.set_result(reply)
