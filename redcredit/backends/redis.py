"""Connecting to Redis, and turning its failures into redcredit errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..config import Settings
from ..errors import BackendUnavailable, ConfigError, RedCreditError
from ..secrets import check_redis_url, masked_url

__all__ = [
    "connection_options",
    "redis_errors_translated",
    "refused_by_redis",
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
    """Options for the clients redcredit creates itself.

    A timed-out script may have run, so it is never re-sent automatically
    (redis-py's default would re-send it, and a spend could be applied twice);
    only a failure to connect or write is retried, once. Callers that must
    retry ambiguous outcomes do so with an idempotency key.
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


def sync_client(settings: Settings, url: str) -> redis.Redis:
    # A blocking pool makes a burst of callers queue for a connection instead
    # of failing with "too many connections".
    _check_tls(url)
    with _url_checked(url):
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            timeout=_seconds(settings.redis_connect_timeout),
            **connection_options(settings),
        )
    return redis.Redis.from_pool(pool)


def async_client(settings: Settings, url: str) -> redis.asyncio.Redis:
    _check_tls(url)
    with _url_checked(url):
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            timeout=_seconds(settings.redis_connect_timeout),
            **connection_options(settings),
        )
    return redis.asyncio.Redis.from_pool(pool)


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


def translated(error: RedisError) -> RedCreditError:
    """The redcredit error for a redis-py one."""
    if isinstance(error, RedisTimeoutError):
        return BackendUnavailable(
            f"Redis did not answer in time ({error}); the call may or may not have been "
            "applied: retry it with the same idempotency key to be sure"
        )
    if isinstance(error, RedisConnectionError):
        return BackendUnavailable(f"Redis is unreachable: {error}")
    return RedCreditError(f"Redis refused the call: {error}")


def refused_by_redis(error: BaseException) -> bool:
    """Whether ``error`` is Redis answering with an error (OOM, READONLY after a failover...).

    Redis was reached and refused for now: for a holder or the gate, an
    outage like one it cannot reach, and not a reason to stop.
    """
    return isinstance(error, RedCreditError) and isinstance(error.__cause__, RedisError)


@contextmanager
def redis_errors_translated() -> Iterator[None]:
    try:
        yield
    except RedisError as exc:
        raise translated(exc) from exc


def _seconds(duration: timedelta) -> float:
    return duration.total_seconds()
