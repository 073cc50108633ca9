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
from typing import Any

import redis.asyncio
from redis.exceptions import NoScriptError, RedisError

from .backend import redis_errors_translated
from .engine import ScriptCall

__all__ = ["Coalescer"]


class Coalescer:
    def __init__(
        self, client: redis.asyncio.Redis, *, max_batch: int = 128, max_in_flight: int = 4
    ) -> None:
        self._client = client
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._senders: set[asyncio.Task[None]] = set()
        # Round trips made and calls they carried, for tests and metrics.
        self.round_trips = 0
        self.calls = 0

    async def run(self, call: ScriptCall) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        if self._in_flight < self._max_in_flight:
            # A free slot: this caller sends the batch it is in, at once.
            self._in_flight += 1
            try:
                await self._send_one()
            finally:
                self._in_flight -= 1
            self._hand_off()
        return await future

    async def _send_one(self) -> None:
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        await self._execute(batch)

    def _hand_off(self) -> None:
        # Calls that queued meanwhile go out from a task, so that no caller
        # waits for other callers' batches after its own reply is in.
        if self._queue and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            sender = asyncio.create_task(self._drain())
            # Keep a reference: the event loop only holds tasks weakly.
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._send_one()
        finally:
            self._in_flight -= 1

    async def _execute(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        if len(batch) == 1:
            await self._execute_alone(*batch[0])
            return
        try:
            with redis_errors_translated():
                pipe = self._client.pipeline(transaction=False)
                for call, _future in batch:
                    pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            # The connection failed: every call of the batch shares the outcome.
            for _call, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (call, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller was cancelled
                continue
            try:
                with redis_errors_translated():
                    if isinstance(reply, NoScriptError):
                        # After a restart or SCRIPT FLUSH: EVAL runs and caches it again.
                        reply = await self._client.eval(
                            call.script.source.decode(), len(call.keys), *call.keys, *call.args
                        )
                    elif isinstance(reply, RedisError):
                        raise reply
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(reply)

    async def _execute_alone(self, call: ScriptCall, future: asyncio.Future[Any]) -> None:
        # A pipeline of one costs more than the plain command.
        try:
            with redis_errors_translated():
                try:
                    reply = await self._client.evalsha(
                        call.script.sha, len(call.keys), *call.keys, *call.args
                    )
                except NoScriptError:
                    reply = await self._client.eval(
                        call.script.source.decode(), len(call.keys), *call.keys, *call.args
                    )
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(reply)
