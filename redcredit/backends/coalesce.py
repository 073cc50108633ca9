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
from redis.exceptions import NoScriptError, ResponseError

from ..core.engine import ScriptCall
from .redis import redis_errors_translated, translated
from .resp import encode_eval, encode_evalsha

__all__ = ["Coalescer"]


def _translated_reply(error: ResponseError) -> Exception:
    # Chained as a raise ... from would, so a traceback shows Redis's own reply.
    reply = translated(error)
    reply.__cause__ = error
    return reply


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
        if not self._queue and self._in_flight < self._max_in_flight:
            # Nothing waiting: this call goes out at once, from the caller's own
            # task, so cancelling the caller cancels nobody else's call.
            self._in_flight += 1
            try:
                return await self._alone(call)
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

    async def _alone(self, call: ScriptCall) -> Any:
        self.round_trips += 1
        self.calls += 1
        with redis_errors_translated():
            reply = (await self._on_connection([call]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _on_connection(self, calls: list[ScriptCall]) -> list[Any]:
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return await self._round_trip(connection, calls)
        except BaseException:
            # A reply may be half read: the connection cannot be reused.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def _execute(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        try:
            with redis_errors_translated():
                replies = await self._on_connection([call for call, _ in batch])
        except BaseException as exc:
            # The connection failed: every call of the batch shares the outcome.
            for _call, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_call, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, connection: Any, calls: list[ScriptCall]) -> list[Any]:
        await connection.send_packed_command(
            b"".join(encode_evalsha(c.script.sha, c.keys, c.args) for c in calls),
            check_health=False,
        )
        replies: list[Any] = []
        retry: list[int] = []
        for index in range(len(calls)):
            try:
                replies.append(await connection.read_response())
            except NoScriptError:
                replies.append(None)
                retry.append(index)
            except ResponseError as exc:
                replies.append(_translated_reply(exc))
        if retry:
            # After a restart or SCRIPT FLUSH: EVAL runs the script and caches it again.
            await connection.send_packed_command(
                b"".join(
                    encode_eval(calls[i].script.source, calls[i].keys, calls[i].args) for i in retry
                ),
                check_health=False,
            )
            for index in retry:
                try:
                    replies[index] = await connection.read_response()
                except ResponseError as exc:
                    replies[index] = _translated_reply(exc)
        return replies
