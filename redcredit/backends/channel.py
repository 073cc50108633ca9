"""Script calls on one connection to one node, sent once and never again.

redis-py re-sends a command when its connection fails while the reply is
awaited (its retry policy cannot tell "not sent" from "sent, reply lost"),
and a script re-sent that way may be applied twice. Here the calls are
written and read on a connection taken from the pool, by hand: a failure to
get a connection means nothing was sent (:class:`NotSent`, safe to try
elsewhere); any failure after that is raised as it is, and nothing is re-sent.

Replies come back one per call, error replies as the exception redis-py's
parser makes of them (MOVED, ASK, TRYAGAIN, OOM...), for the caller to route.
A call with a ``wait`` (WAIT / WAITAOF) gets ``(reply, confirmation)``: both
commands go on the same connection, which is what the wait is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import BusyLoadingError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from ..core.engine import ScriptCall
from .resp import encode_command, encode_eval, encode_evalsha

__all__ = ["NotSent", "round_trip", "round_trip_async"]


class NotSent(Exception):
    """No connection could be had: not one byte of the calls left."""

    def __init__(self, error: RedisError | OSError) -> None:
        super().__init__(str(error))
        self.error: RedisError = (
            error if isinstance(error, RedisError) else RedisConnectionError(str(error))
        )


def _packed(calls: Sequence[ScriptCall], *, asking: bool, by_source: bool) -> bytes:
    parts: list[bytes] = []
    for call in calls:
        if asking:
            parts.append(encode_command("ASKING"))
        if by_source:
            parts.append(encode_eval(call.script.source, call.keys, call.args))
        else:
            parts.append(encode_evalsha(call.script.sha, call.keys, call.args))
        if call.wait is not None:
            parts.append(encode_command(*call.wait))
    return b"".join(parts)


def _reply_count(call: ScriptCall, *, asking: bool) -> int:
    return 1 + asking + (call.wait is not None)


def _assembled(call: ScriptCall, replies: list[Any], *, asking: bool) -> Any:
    if asking:
        replies = replies[1:]  # ASKING's own OK (or its error, which the script's reply repeats)
    if call.wait is None:
        return replies[0]
    return (replies[0], replies[1])


def _missing_script(call: ScriptCall, reply: Any) -> bool:
    first = reply[0] if call.wait is not None else reply
    return isinstance(first, NoScriptError)


# -- synchronous ---------------------------------------------------------------------


# What redis-py's parser raises, besides its own errors, when a connection is
# cut while a reply is read (its reader already gone).
_TORN = (AttributeError, IndexError, ValueError)


def _broken(error: Exception) -> RedisConnectionError:
    return RedisConnectionError(
        f"the connection broke while the reply was read ({type(error).__name__}: {error})"
    )


# redis-py raises LOADING as a connection error; it is a reply like the others
# (nothing ran), and the replies after it on the connection are still good.
_REPLIES = (ResponseError, BusyLoadingError)


def _read_sync(connection: Any) -> Any:
    try:
        return connection.read_response()
    except _REPLIES as error:
        return error


def round_trip(
    pool: redis.ConnectionPool, calls: Sequence[ScriptCall], *, asking: bool = False
) -> list[Any]:
    try:
        connection = pool.get_connection()
    except (RedisError, OSError) as error:
        raise NotSent(error) from error
    try:
        replies = _exchange_sync(connection, calls, asking=asking, by_source=False)
        retry = [i for i, reply in enumerate(replies) if _missing_script(calls[i], reply)]
        if retry:
            # After a restart, failover or SCRIPT FLUSH: EVAL runs the script and
            # caches it again; a call that found no script did nothing.
            again = _exchange_sync(
                connection, [calls[i] for i in retry], asking=asking, by_source=True
            )
            for index, reply in zip(retry, again, strict=True):
                replies[index] = reply
        return replies
    except _TORN as error:
        # redis-py's own state of a connection torn mid-reply: an outage, typed.
        connection.disconnect()  # type: ignore[no-untyped-call]
        raise _broken(error) from error
    except BaseException:
        # A reply may be half read: the connection cannot be reused.
        connection.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(connection)


def _exchange_sync(
    connection: Any, calls: Sequence[ScriptCall], *, asking: bool, by_source: bool
) -> list[Any]:
    connection.send_packed_command(
        [_packed(calls, asking=asking, by_source=by_source)], check_health=False
    )
    replies = []
    for call in calls:
        raw = [_read_sync(connection) for _ in range(_reply_count(call, asking=asking))]
        replies.append(_assembled(call, raw, asking=asking))
    return replies


# -- asyncio -------------------------------------------------------------------------


async def _read_async(connection: Any) -> Any:
    try:
        return await connection.read_response()
    except _REPLIES as error:
        return error


async def round_trip_async(
    pool: redis.asyncio.ConnectionPool, calls: Sequence[ScriptCall], *, asking: bool = False
) -> list[Any]:
    try:
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as error:
        raise NotSent(error) from error
    try:
        replies = await _exchange_async(connection, calls, asking=asking, by_source=False)
        retry = [i for i, reply in enumerate(replies) if _missing_script(calls[i], reply)]
        if retry:
            again = await _exchange_async(
                connection, [calls[i] for i in retry], asking=asking, by_source=True
            )
            for index, reply in zip(retry, again, strict=True):
                replies[index] = reply
        return replies
    except _TORN as error:
        # redis-py's own state of a connection torn mid-reply: an outage, typed.
        await connection.disconnect()
        raise _broken(error) from error
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


async def _exchange_async(
    connection: Any, calls: Sequence[ScriptCall], *, asking: bool, by_source: bool
) -> list[Any]:
    await connection.send_packed_command(
        _packed(calls, asking=asking, by_source=by_source), check_health=False
    )
    replies = []
    for call in calls:
        raw = [await _read_async(connection) for _ in range(_reply_count(call, asking=asking))]
        replies.append(_assembled(call, raw, asking=asking))
    return replies
