"""Connecting to Redis, and turning its failures into redcredit errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    ClusterError,
    CrossSlotTransactionError,
    ExecAbortError,
    InvalidPipelineStack,
    InvalidResponse,
    MasterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..config import Settings
from ..errors import (
    BackendUnavailable,
    ConfigError,
    RedCreditError,
    RedisAuthError,
    RedisCommandError,
    RedisRefused,
)
from ..secrets import check_redis_url, masked_url

__all__ = [
    "connection_options",
    "redis_errors_translated",
    "require_url",
    "translated",
    "url_options",
]

# The query options of a rediss:// URL that name files (redis-py reads them as given).
_TLS_FILES: Final = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})


def require_url(settings: Settings) -> str:
    if settings.redis_url is None:
        raise ConfigError("no Redis to talk to: pass a client or a URL, or set REDCREDIT_REDIS_URL")
    return settings.redis_url


def connection_options(settings: Settings) -> dict[str, Any]:
    """Options for the connections redcredit opens itself.

    Scripts never go through redis-py's retries (backends/channel.py sends
    them by hand: a script whose reply was lost may have run). The retry
    here serves the other commands — map reads, the syncer's stream reads —
    which are safe to send again after a failed connection.
    """
    return {
        "socket_timeout": _seconds(settings.redis_socket_timeout),
        "socket_connect_timeout": _seconds(settings.redis_connect_timeout),
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "health_check_interval": 30,
    }


def url_options(url: object, *, asyncio_: bool) -> dict[str, Any]:
    """The connection options a Redis URL gives (host, port, credentials, TLS), checked."""
    _check_tls(url)
    with _url_checked(url):
        assert isinstance(url, str)
        parse = redis.asyncio.connection.parse_url if asyncio_ else redis.connection.parse_url
        return dict(parse(url))


@contextmanager
def _url_checked(url: object) -> Iterator[None]:
    if not isinstance(url, str):
        raise ConfigError(f"a Redis URL must be a str, not {type(url).__name__}")
    try:
        yield
    except ValueError as exc:
        # redis-py's messages name the part at fault, never the password.
        raise ConfigError(f"unusable Redis URL: {exc}") from exc


def _check_tls(url: object) -> None:
    """A URL redis-py can read, TLS options only on ``rediss://``, and the files they name.

    A missing CA file would otherwise surface on every call as "Redis is
    unreachable", which the gate's policies treat as an outage.
    """
    if not isinstance(url, str):
        return
    check_redis_url(url)
    for name, value in parse_qsl(urlsplit(url).query):
        if name in _TLS_FILES and not Path(value).is_file():
            raise ConfigError(f"Redis URL {masked_url(url)!r}: {name} {value!r} is not a file")


# Redis's codes for "refused for now": the call was not applied, and the same
# call may succeed later (after eviction, a failover, a load, a script's end).
_REFUSED_FOR_NOW: Final = frozenset(
    {
        "OOM",
        "READONLY",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "NOREPLICAS",
        "MISCONF",
        "MOVED",
        "ASK",
    }
)

# The codes redis-py strips from the message of the classes it maps them to,
# most specific first (MasterDownError is a ClusterDownError, MovedError an AskError).
_CODES: Final[tuple[tuple[type[RedisError], str], ...]] = (
    (OutOfMemoryError, "OOM"),
    (ReadOnlyError, "READONLY"),
    (BusyLoadingError, "LOADING"),
    (MasterDownError, "MASTERDOWN"),
    (ClusterDownError, "CLUSTERDOWN"),
    (TryAgainError, "TRYAGAIN"),
    (MovedError, "MOVED"),
    (AskError, "ASK"),
    (ClusterCrossSlotError, "CROSSSLOT"),
    (NoPermissionError, "NOPERM"),
    (NoScriptError, "NOSCRIPT"),
    (ExecAbortError, "EXECABORT"),
)

_CODE: Final = re.compile(r"[A-Z][A-Z_-]+")

_HINTS: Final = {
    "READONLY": " (a replica: after a failover, point redcredit at the new primary)",
    "NOPERM": " (check the ACL user's rights)",
    "MOVED": " (the key's slot is served by another node: set redis_cluster to auto or true)",
}


def translated(error: RedisError | RedisClusterException) -> RedCreditError:
    """The redcredit error for a redis-py one: every failure gets a type of its own.

    Redis refusing for now is :class:`RedisRefused` and a login refused
    :class:`RedisAuthError`, outages both, like a Redis out of reach; an
    error that calling again will not mend is :class:`RedisCommandError`.
    """
    if isinstance(error, RedisTimeoutError):
        return BackendUnavailable(
            f"Redis did not answer in time ({error}); the call may or may not have been "
            "applied: retry it with the same idempotency key to be sure"
        )
    if isinstance(error, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        kind, said = _code(error)
        # Redis never repeats a password in its replies, so what it said is safe to show.
        return RedisAuthError(
            kind,
            f"Redis refused the credentials: {said} "
            "(check the user name and password of the Redis URL)",
        )
    if isinstance(error, BusyLoadingError | ResponseError):
        kind, said = _code(error)
        if kind in _REFUSED_FOR_NOW:
            return RedisRefused(
                kind, f"Redis refused the call for now: {said}{_HINTS.get(kind, '')}"
            )
        return RedisCommandError(kind, f"Redis refused the call: {said}{_HINTS.get(kind, '')}")
    if isinstance(error, RedisConnectionError):
        return BackendUnavailable(f"Redis is unreachable: {error}")
    if isinstance(error, InvalidResponse):
        # Half a reply, or a server that does not speak RESP: the connection is unusable.
        return BackendUnavailable(f"Redis answered what redis-py cannot read: {error}")
    if isinstance(error, CrossSlotTransactionError | InvalidPipelineStack):
        return RedisCommandError(None, f"redis-py refused the call: {error}")
    if isinstance(error, ClusterError | RedisClusterException):
        # No reachable node, slots not covered, nodes that disagree, redirections
        # without end: the cluster cannot serve the call now.
        return BackendUnavailable(f"Redis Cluster cannot serve the call: {error}")
    # DataError and the like: redis-py refused the call before sending it.
    return RedisCommandError(None, f"redis-py refused the call: {error}")


def _code(error: RedisError) -> tuple[str, str]:
    """Redis's error code, and its whole reply: the code first, as Redis sent it."""
    text = str(error)
    code = next((code for cls, code in _CODES if isinstance(error, cls)), None)
    if code is None:
        status = getattr(error, "status_code", None)
        code = status if isinstance(status, str) and status else None
    if code is None:
        head = text.partition(" ")[0]
        # An unmapped code (BUSY, NOREPLICAS, MISCONF...) stays in redis-py's message.
        code = head if _CODE.fullmatch(head) else "ERR"
    # redis-py strips the code of the replies it maps; put it back, once.
    said = text if text == code or text.startswith(f"{code} ") else f"{code} {text}".rstrip()
    return code, said


@contextmanager
def redis_errors_translated() -> Iterator[None]:
    try:
        yield
    except (RedisError, RedisClusterException) as exc:
        raise translated(exc) from exc


def _seconds(duration: timedelta) -> float:
    return duration.total_seconds()
