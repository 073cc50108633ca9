"""Security basics, each against real servers.

Least privilege (a Redis ACL user), TLS (``rediss://``), accounts and tenants
that cannot reach each other's keys, parameterised SQL, an identity that only
the application chooses, and passwords that never show in errors or logs.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import re
import socket
import ssl
import string
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis
import trustme
from fastapi import Depends, FastAPI, Request
from psycopg_pool import ConnectionPool
from redis.backoff import NoBackoff
from redis.retry import Retry

import redcredit
from redcredit import (
    AsyncRedCredit,
    BackendUnavailable,
    ConfigError,
    RedCredit,
    RedCreditError,
    RedisAuthError,
    RedisCommandError,
    Settings,
)
from redcredit.backends.migrate import migrations
from redcredit.backends.postgres_loader import PostgresLoader
from redcredit.cli import main as cli_main
from redcredit.core.keys import KeySpace
from redcredit.errors import EmbeddedServerError, ReservationNotFound
from redcredit.http.asgi import CreditGate
from redcredit.http.fastapi import CreditDependency, add_problem_handler, gate
from redcredit.http.routes import Route
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile, scan_accounts
from redcredit.ledger.syncer import Syncer
from redcredit.results import ReservationRef
from redcredit.secrets import masked_url
from redcredit.servers.redis import EmbeddedRedis
from redcredit.servers.spawn import free_port
from tests.support.helpers import account_entries, snapshot
from tests.support.netproxy import NetProxy

ACL_DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"
PACKAGE = Path(redcredit.__file__).resolve().parent


# --- least privilege -----------------------------------------------------------------------------


def _documented_acl(password: str) -> list[str]:
    text = ACL_DOC.read_text()
    block = re.search(r"```\nACL SETUSER (.*?)```", text, re.S)
    assert block is not None
    words = block[1].split()
    return [password if w == ">CHANGE-ME" else w for w in words]


def _for_this_server(admin: redis.Redis, rules: list[str]) -> list[str]:
    version = tuple(int(part) for part in admin.info("server")["redis_version"].split(".")[:2])
    if version < (7, 2):  # as the doc says
        return [r for r in rules if r not in ("+client|setinfo", "+waitaof")]
    return rules


def test_documented_acl_user_runs_the_syncer_reconcile_and_evict(
    redis_factory, pg_settings: Settings, pg
) -> None:
    """Everything the syncers do (leases and membership included) is in the documented ACL."""
    server = redis_factory(password="admin-secret", appendonly=True)
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", *_for_this_server(admin, _documented_acl(">s-pw")))
    url = f"redis://redcredit:s-pw@127.0.0.1:{server.port}/0"
    limited = pg_settings.model_copy(update={"redis_url": url, "key_prefix": "rc"})
    with (
        RedCredit(settings=limited) as rc,
        Syncer(limited, consumer="one") as one,
        Syncer(limited, consumer="two") as two,
    ):
        for i in range(20):
            rc.spend(f"acl-{i}", cost=1)
        for syncer in (one, two, one, two):  # leases taken, then shared out
            syncer._next_renewal = 0.0
            syncer.renew_leases()
        assert len(one.leases.held) == len(two.leases.held) == limited.partitions // 2
        assert one.run_once() + two.run_once() == 40
        admin.script_flush()  # the syncer's own scripts come back through SCRIPT LOAD
        for i in range(20):
            rc.spend(f"acl-{i}", cost=1)
        one._next_renewal = two._next_renewal = 0.0
        assert one.run_once() + two.run_once() == 20
        assert one.lag().caught_up
    assert pg.execute(f'SELECT count(*) FROM "{limited.pg_schema}".ledger').fetchone() == (60,)
    user = redis.Redis.from_url(url)
    assert reconcile(limited, user, pg).clean
    assert evict_idle(limited, user, pg, idle=timedelta(0)).evicted == 20
    user.close()
    admin.close()


def test_documented_acl_user_can_do_everything_and_nothing_else(
    redis_factory, settings: Settings
) -> None:
    server = redis_factory(password="admin-secret")
    admin = redis.Redis.from_url(server.url)
    rules = _documented_acl(">app-secret")
    admin.execute_command("ACL", "SETUSER", *_for_this_server(admin, rules))
    url = f"redis://redcredit:app-secret@127.0.0.1:{server.port}/0"
    limited = settings.model_copy(update={"redis_url": url, "key_prefix": "rc"})
    with RedCredit(settings=limited) as rc:
        rc.spend("acl-user", cost=5, idempotency_key="k")
        reservation = rc.reserve("acl-user", 10)
        rc.extend(reservation)
        rc.settle(reservation, 3)
        rc.grant("acl-user", 1)
        rc.set_plan("acl-user", "paid")
        admin.script_flush()  # NOSCRIPT recovery goes through EVAL, allowed too
        assert rc.balance("acl-user").credits == 93
        # Another prefix is out of reach, even through the scripts.
        other = settings.model_copy(update={"redis_url": url, "key_prefix": "other"})
        with RedCredit(settings=other) as intruder, pytest.raises(RedisCommandError) as denied:
            intruder.spend("acl-user", cost=1)
        assert denied.value.kind == "NOPERM"
    user = redis.Redis.from_url(url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.get("other:v1:{1}:a:x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.flushall()
    user.close()
    admin.close()


def test_wrong_password_is_a_clear_error_without_the_secret(
    redis_factory,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = redis_factory(password="right-secret")
    url = f"redis://default:wrong-secret@127.0.0.1:{server.port}/0"
    with (
        RedCredit(settings=settings.model_copy(update={"redis_url": url})) as rc,
        pytest.raises(RedisAuthError) as failed,
    ):
        rc.spend("x", cost=1)
    # Counted with the outages (as a PostgreSQL refusing the login is), and
    # says what to fix.
    assert isinstance(failed.value, BackendUnavailable)
    assert "WRONGPASS" in str(failed.value) and "password of the Redis URL" in str(failed.value)
    _assert_hidden(str(failed.value), "wrong-secret", "right-secret")
    # The command says so too, with the status of a server refusing the login.
    for name in [n for n in os.environ if n.upper().startswith("REDCREDIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("REDCREDIT_REDIS_URL", url)
    assert cli_main(["sync", "--status"]) == 3
    err = capsys.readouterr().err
    assert "WRONGPASS" in err
    _assert_hidden(err, "wrong-secret", "right-secret")


# --- TLS ---------------------------------------------------------------------------------------
# The embedded Valkey is built without TLS, so a NetProxy terminates TLS in
# front of it; a server binary with TLS of its own is tested natively too.

TLS_PASSWORD = "tls-secret"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def _rediss(port: int, *, password: str = TLS_PASSWORD, **query: Path | str) -> str:
    options = "&".join(f"{name}={quote(str(value), safe='')}" for name, value in query.items())
    return f"rediss://default:{password}@127.0.0.1:{port}/0" + (f"?{options}" if options else "")


@pytest.fixture(params=["proxy", "native"])
def tls_port(
    request: pytest.FixtureRequest,
    redis_factory: Callable[..., EmbeddedRedis],
    ca: trustme.CA,
    tmp_path: Path,
) -> Iterator[int]:
    """The port of a password-protected Redis that speaks only TLS, for 127.0.0.1."""
    cert = ca.issue_cert("127.0.0.1")
    if request.param == "proxy":
        server = redis_factory(password=TLS_PASSWORD)
        with NetProxy(server.port, tls=_server_context(cert)) as proxy:
            yield proxy.port
        return
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    port = free_port()
    try:
        redis_factory(
            password=TLS_PASSWORD,
            extra_args=[
                "--tls-port", str(port),
                "--tls-cert-file", str(files["cert"]),
                "--tls-key-file", str(files["key"]),
                "--tls-ca-cert-file", str(files["ca"]),
                "--tls-auth-clients", "no",
            ],
        )  # fmt: skip
    except EmbeddedServerError as exc:
        if "TLS support" in str(exc) or "connection type tls" in str(exc):
            pytest.skip("the Redis server binary is built without TLS; the proxy case covers it")
        raise
    yield port


def _exercise(rc: RedCredit) -> tuple[int, int]:
    rc.spend("tls", cost=5, idempotency_key="k")
    reservation = rc.reserve("tls", 20)
    rc.settle(reservation, 7)
    balance = rc.balance("tls")
    return balance.credits, balance.held


def test_rediss_with_the_ca_configured_serves_every_call(
    tls_port: int, ca_file: Path, settings: Settings
) -> None:
    url = _rediss(tls_port, ssl_ca_certs=ca_file)
    with RedCredit(settings=settings.model_copy(update={"redis_url": url})) as rc:
        assert _exercise(rc) == (88, 0)
    # The port speaks nothing but TLS: a plain client is turned away.
    no_retry = Retry(NoBackoff(), 0)
    with (
        redis.Redis(
            port=tls_port, password=TLS_PASSWORD, socket_timeout=2, retry=no_retry
        ) as plain,
        pytest.raises(redis.ConnectionError),
    ):
        plain.ping()


async def test_rediss_async_client_with_the_ca_configured(
    tls_port: int, ca_file: Path, settings: Settings
) -> None:
    url = _rediss(tls_port, ssl_ca_certs=ca_file)
    async with AsyncRedCredit(settings=settings.model_copy(update={"redis_url": url})) as arc:
        await arc.spend("tls", cost=5, idempotency_key="k")
        reservation = await arc.reserve("tls", 20)
        await arc.settle(reservation, 7)
        balance = await arc.balance("tls")
    assert (balance.credits, balance.held) == (88, 0)


@pytest.mark.parametrize("case", ["untrusted CA", "no CA given", "other host name"])
async def test_a_server_whose_certificate_is_not_trusted_is_refused(
    case: str,
    redis_factory: Callable[..., EmbeddedRedis],
    ca: trustme.CA,
    ca_file: Path,
    settings: Settings,
) -> None:
    if case == "untrusted CA":
        cert, url_options = trustme.CA().issue_cert("127.0.0.1"), {"ssl_ca_certs": ca_file}
    elif case == "no CA given":  # the system's CAs, which never signed a test CA
        cert, url_options = ca.issue_cert("127.0.0.1"), {}
    else:
        cert, url_options = ca.issue_cert("redis.example"), {"ssl_ca_certs": ca_file}
    server = redis_factory(password=TLS_PASSWORD)
    with NetProxy(server.port, tls=_server_context(cert)) as proxy:
        spoofed = settings.model_copy(update={"redis_url": _rediss(proxy.port, **url_options)})
        with RedCredit(settings=spoofed) as rc, pytest.raises(BackendUnavailable) as sync_error:
            rc.spend("tls", cost=1)
        async with AsyncRedCredit(settings=spoofed) as arc:
            with pytest.raises(BackendUnavailable) as async_error:
                await arc.spend("tls", cost=1)
    for error in (sync_error.value, async_error.value):
        assert "certificate verify failed" in str(error)
        _assert_hidden(_error_text(error), TLS_PASSWORD)
    with redis.Redis.from_url(server.url) as admin:
        assert admin.dbsize() == 0  # not a byte of the calls reached the server


def test_client_certificate_when_the_server_demands_one(
    redis_factory: Callable[..., EmbeddedRedis],
    ca: trustme.CA,
    ca_file: Path,
    tmp_path: Path,
    settings: Settings,
) -> None:
    context = _server_context(ca.issue_cert("127.0.0.1"))
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    client_cert = ca.issue_cert("redcredit@example.com")
    certfile, keyfile = tmp_path / "client.pem", tmp_path / "client.key"
    client_cert.cert_chain_pems[0].write_to_path(str(certfile))
    client_cert.private_key_pem.write_to_path(str(keyfile))
    server = redis_factory(password=TLS_PASSWORD)
    with NetProxy(server.port, tls=context) as proxy:
        mutual = _rediss(
            proxy.port, ssl_ca_certs=ca_file, ssl_certfile=certfile, ssl_keyfile=keyfile
        )
        with RedCredit(settings=settings.model_copy(update={"redis_url": mutual})) as rc:
            assert _exercise(rc) == (88, 0)
        anonymous = _rediss(proxy.port, ssl_ca_certs=ca_file)
        with (
            RedCredit(settings=settings.model_copy(update={"redis_url": anonymous})) as rc,
            pytest.raises(BackendUnavailable),
        ):
            rc.spend("tls", cost=1)


def test_tls_options_are_refused_where_they_would_be_ignored_or_fail_late(
    ca_file: Path, settings: Settings
) -> None:
    # On redis:// redis-py would fail only at the first command, with a TypeError.
    plain = f"redis://default:{TLS_PASSWORD}@127.0.0.1:6379/0?ssl_ca_certs={ca_file}"
    with pytest.raises(ConfigError, match="need a rediss:// URL") as from_settings:
        Settings(redis_url=plain)
    with pytest.raises(ConfigError, match="need a rediss:// URL") as from_url:
        RedCredit(plain, settings=settings)
    # A missing CA file would otherwise read as "Redis is unreachable" on every call.
    missing = _rediss(6379, ssl_ca_certs=ca_file.with_name("missing.pem"))
    with pytest.raises(ConfigError, match=r"ssl_ca_certs .* is not a file") as no_file:
        RedCredit(missing, settings=settings)
    for error in (from_settings.value, from_url.value, no_file.value):
        _assert_hidden(_error_text(error), TLS_PASSWORD)


# --- the proxy's stalls ------------------------------------------------------------------------


def _receive_until(sock: socket.socket, needle: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while needle not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed before {needle!r}; got {data!r}")
        data += chunk
    return data


def _assert_silent(sock: socket.socket, for_s: float = 0.3) -> None:
    sock.settimeout(for_s)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_pause_holds_bytes_both_ways_and_resume_delivers_them(
    redis_factory: Callable[..., EmbeddedRedis],
) -> None:
    server = redis_factory()
    direct = redis.Redis.from_url(server.url)
    with NetProxy(server.port) as proxy:
        requests = socket.create_connection(("127.0.0.1", proxy.port))
        subscriber = socket.create_connection(("127.0.0.1", proxy.port))
        requests.sendall(b"PING\r\n")
        _receive_until(requests, b"+PONG")
        subscriber.sendall(b"SUBSCRIBE news\r\n")
        _receive_until(subscriber, b":1\r\n")
        proxy.pause()
        assert proxy.paused
        # Client to server: the command does not reach Redis.
        requests.sendall(b"INCR held\r\n")
        _assert_silent(requests)
        assert direct.get("held") is None
        # Server to client: Redis sent the message, the subscriber does not get it.
        assert direct.publish("news", "stalled") == 1
        _assert_silent(subscriber)
        # A connection opened meanwhile is held too, not refused.
        late = socket.create_connection(("127.0.0.1", proxy.port))
        late.sendall(b"PING\r\n")
        _assert_silent(late)
        assert proxy.connections == 3
        proxy.resume()
        assert not proxy.paused
        assert _receive_until(requests, b"\r\n") == b":1\r\n"
        assert b"stalled" in _receive_until(subscriber, b"stalled")
        assert _receive_until(late, b"+PONG") == b"+PONG\r\n"
        # Closing a paused proxy ends its connections at once.
        proxy.pause()
        proxy.close()
        requests.settimeout(2)
        assert requests.recv(4096) == b""
    for sock in (requests, subscriber, late):
        sock.close()
    direct.close()


def test_a_stalled_call_times_out_in_flight_and_its_retry_charges_once(
    redis_factory: Callable[..., EmbeddedRedis], settings: Settings
) -> None:
    server = redis_factory()
    with NetProxy(server.port) as proxy:
        stalled = settings.model_copy(
            update={
                "redis_url": f"redis://127.0.0.1:{proxy.port}/0",
                "redis_socket_timeout": timedelta(milliseconds=300),
            }
        )
        with RedCredit(settings=stalled) as rc:
            rc.balance("a")  # connected, scripts loaded
            proxy.pause()
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="may or may not"):
                rc.spend("a", cost=10, idempotency_key="order-1")
            assert time.monotonic() - started < 2
            proxy.resume()
            # The held spend reaches Redis now; with the same key the retry
            # charges once, whichever of the two lands first.
            rc.spend("a", cost=10, idempotency_key="order-1")
            deadline = time.monotonic() + 5
            while proxy.connections > 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rc.balance("a").credits == 90
    with redis.Redis.from_url(server.url) as direct:
        spends = [
            e for e in account_entries(direct, settings.key_prefix, "a") if e["op"] == "spend"
        ]
    assert len(spends) == 1


# --- accounts and tenants ----------------------------------------------------------------------

VICTIM = "victim"


def _same_partition_id(keys: KeySpace) -> tuple[str, str]:
    """An id ``victim:N`` in the victim's partition, and the idempotency key ``N:k``.

    Without the length in the idempotency key's name, ``victim`` with key
    ``N:k`` and ``victim:N`` with key ``k`` would share one record.
    """
    for n in range(100_000):
        if keys.partition(f"{VICTIM}:{n}") == keys.partition(VICTIM):
            return f"{VICTIM}:{n}", f"{n}:k"
    raise AssertionError("no id shares the victim's partition")


def _crafted_ids(keys: KeySpace, victim_hold: str, same_partition: str) -> list[str]:
    victim = keys.for_account(VICTIM)
    tag = keys.tag(keys.partition(VICTIM))
    return [
        # Braces: a hash tag of their own, or an attempt to close the real one.
        "{0}", "{", "}", "{victim}", "victim}", "}:a:victim", "x}:a:victim",
        # Separators and kinds: the victim's name with a key part around it.
        ":victim", "victim:", "a:victim", "h:victim", "r:victim", f"i:6:{VICTIM}",
        # Glob characters, as SCAN patterns would read them.
        "*", "victim*", "*victim", "?ictim", "[v]ictim", "\\*",
        # The victim's own key names, its tag, and this deployment's prefixes.
        victim.hash, victim.holds, victim.journal, victim.reservation(victim_hold), tag,
        keys.prefix, f"{keys.prefix}:", keys.account_pattern(),
        f"{VICTIM}:{victim_hold}", same_partition,
        # Look-alikes: other accounts, never the victim's.
        "VICTIM", "v\u0456ctim", "\uff56ictim", "vic tim",
    ]  # fmt: skip


def _key_states(client: redis.Redis, names: list[bytes]) -> dict[bytes, Any]:
    states: dict[bytes, Any] = {}
    for name in names:
        kind = client.type(name)
        if kind == b"hash":
            value: Any = client.hgetall(name)
        elif kind == b"zset":
            value = client.zrange(name, 0, -1, withscores=True)
        else:
            value = client.dump(name)
        states[name] = (kind, value, client.pttl(name) > 0)
    return states


def _journal_of(client: redis.Redis, keys: KeySpace, account: str) -> list[Any]:
    # By the journals' exact names: a glob like *:journal would also match
    # the keys of an account whose id ends in ":journal".
    return [
        (stream_id, fields)
        for stream in keys.journals()
        for stream_id, fields in client.xrange(stream)
        if fields[b"a"] == account.encode()
    ]


def test_no_crafted_account_id_reaches_another_accounts_state(
    rc: RedCredit, settings: Settings, redis_client: redis.Redis
) -> None:
    keys = KeySpace(settings.versioned_prefix, settings.partitions)
    same_partition, colliding_key = _same_partition_id(keys)
    rc.spend(VICTIM, cost=7, idempotency_key="shared-key")
    rc.spend(VICTIM, cost=4, idempotency_key=colliding_key)
    victim_hold = rc.reserve(VICTIM, 11)
    rc.grant(VICTIM, 3)
    # Only the victim exists so far: every key but the journals is its own.
    victim_keys = [
        k for k in redis_client.scan_iter(match=f"{settings.key_prefix}:*") if b"journal" not in k
    ]
    before = _key_states(redis_client, victim_keys)
    journal_before = _journal_of(redis_client, keys, VICTIM)
    balance_before = rc.balance(VICTIM)

    crafted = _crafted_ids(keys, victim_hold.id, same_partition)
    for n, account in enumerate(crafted):
        cost = 1 + n % 5
        key = "k" if account == same_partition else "shared-key"
        spent = rc.spend(account, cost=cost, idempotency_key=key)
        assert (spent.replayed, spent.credits_remaining) == (False, 100 - cost), account
        hold = rc.reserve(account, 2)
        rc.settle(hold, 1)
        rc.grant(account, 1)
        rc.set_plan(account, "starter")
        # The victim's reservation, named under another account, is not found.
        with pytest.raises(ReservationNotFound):
            rc.release(ReservationRef(account, victim_hold.id))
        balance = rc.balance(account)
        assert (balance.credits, balance.held, balance.plan) == (100 - cost, 0, "starter")

    assert _key_states(redis_client, victim_keys) == before
    assert _journal_of(redis_client, keys, VICTIM) == journal_before
    after = rc.balance(VICTIM)
    assert (after.credits, after.held, after.plan, after.sequence) == (
        balance_before.credits,
        balance_before.held,
        balance_before.plan,
        balance_before.sequence,
    )
    # reconcile and evict find accounts by SCAN: the ids they see are exactly
    # those used, though the SCAN pattern also matches keys such as the holds
    # of "}:a:victim", which would read as the victim's.
    assert sorted(set(scan_accounts(redis_client, keys))) == sorted([*crafted, VICTIM])


def test_one_tenant_prefix_never_reaches_another(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    # One prefix starts the other: a careless glob or split would mix them.
    mine = Settings(redis_url=redis_url, key_prefix=prefix, free_credits=100)
    theirs = Settings(redis_url=redis_url, key_prefix=f"{prefix}-b", free_credits=100)
    their_keys = KeySpace(theirs.versioned_prefix, theirs.partitions)
    my_keys = KeySpace(mine.versioned_prefix, mine.partitions)
    with RedCredit(settings=mine) as me, RedCredit(settings=theirs) as them:
        them.spend("shared", cost=30)
        them.reserve("shared", 5)
        their_state = snapshot(redis_client, f"{theirs.versioned_prefix}:")
        # Their key names as my account ids, and the same id as theirs.
        targets = [
            "shared",
            their_keys.for_account("shared").hash,
            their_keys.journal(their_keys.partition("shared")),
            their_keys.account_pattern(),
            f"{theirs.key_prefix}:",
            f"-b:v1:{{{their_keys.partition('shared')}}}:a:shared",
        ]
        for account in targets:
            me.spend(account, cost=5)
            hold = me.reserve(account, 3)
            me.settle(hold, 3)
        assert snapshot(redis_client, f"{theirs.versioned_prefix}:") == their_state
        assert (them.balance("shared").credits, them.balance("shared").held) == (70, 5)
        assert me.balance("shared").credits == 92
    mine_found = set(scan_accounts(redis_client, my_keys))
    assert (mine_found, set(scan_accounts(redis_client, their_keys))) == (set(targets), {"shared"})


# --- SQL ---------------------------------------------------------------------------------------
# Every statement the package sends is text written in the source, or a
# psycopg.sql composition of such text with quoted identifiers, literals and
# placeholders. The checker follows names to where they were assigned (in
# the function, the class's self attributes, the module, or a function of
# the package that returns the statement); anything it cannot prove is a
# violation.

_SQL_CALLS = frozenset({"execute", "executemany", "copy"})
_QUOTING = frozenset({"Identifier", "Literal", "Placeholder"})
# SQL text that is not a literal in the source, with why it is not runtime input.
_TRUSTED_TEXT = {
    (
        "backends/postgres/admin.py",
        "migration_text",
    ): "the package's own migration files, checked below",
}


Function = ast.FunctionDef | ast.AsyncFunctionDef
Scopes = tuple[Function, ...]  # the enclosing functions, outermost first


@dataclass
class _Module:
    name: str
    tree: ast.Module
    functions: dict[str, Function]
    constants: dict[str, ast.expr]
    imported: dict[str, tuple[str, str]]  # local name -> (module file, name there)


def _parse_module(name: str, source: str) -> _Module:
    tree = ast.parse(source)
    functions: dict[str, Function] = {}
    constants: dict[str, ast.expr] = {}
    imported: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, Function):
            functions[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    constants[target.id] = node.value
        elif isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
            # Files are named by their path in the package: resolve the relative import.
            package = name.split("/")[:-1]
            base = package[: len(package) - (node.level - 1)]
            file = "/".join([*base, *node.module.split(".")]) + ".py"
            for alias in node.names:
                imported[alias.asname or alias.name] = (file, alias.name)
    return _Module(name, tree, functions, constants, imported)


def _assignments(function: Function, name: str) -> list[tuple[ast.expr | None, int | None]]:
    """What ``name`` is bound to in ``function``: (value, index into it when unpacked)."""
    found: list[tuple[ast.expr | None, int | None]] = []
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign | ast.NamedExpr):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.For | ast.AsyncFor | ast.With | ast.AsyncWith):
            # Bound by a loop or a with: not a statement this check can follow.
            bound = (
                [node.target]
                if isinstance(node, ast.For | ast.AsyncFor)
                else [item.optional_vars for item in node.items if item.optional_vars is not None]
            )
            if any(isinstance(n, ast.Name) and n.id == name for b in bound for n in ast.walk(b)):
                found.append((None, None))
            continue
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id == name:
                found.append((value, None))
            elif isinstance(target, ast.Tuple):
                for i, element in enumerate(target.elts):
                    if isinstance(element, ast.Name) and element.id == name:
                        found.append((value, i))
    return found


class _SqlChecker:
    def __init__(self, modules: dict[str, _Module]) -> None:
        self.modules = modules
        self.checked = 0
        self.violations: list[str] = []

    def run(self) -> None:
        for module in self.modules.values():
            self._visit(module, module.tree, (), None)

    def _visit(
        self, module: _Module, node: ast.AST, scopes: Scopes, cls: ast.ClassDef | None
    ) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                self._visit(module, child, scopes, child)
            elif isinstance(child, Function):
                self._visit(module, child, (*scopes, child), cls)
            else:
                if isinstance(child, ast.Call):
                    self._check_call(module, child, scopes, cls)
                self._visit(module, child, scopes, cls)

    def _check_call(
        self, module: _Module, call: ast.Call, scopes: Scopes, cls: ast.ClassDef | None
    ) -> None:
        func = call.func
        if _is_sql_text(func):
            statement: ast.expr | None = call
        elif isinstance(func, ast.Attribute) and func.attr in _SQL_CALLS:
            keyword = next((k.value for k in call.keywords if k.arg == "query"), None)
            statement = call.args[0] if call.args else keyword
        else:
            return
        if statement is None:  # redis pipelines' execute(), dict.copy()
            return
        self.checked += 1
        if not self._safe(module, statement, scopes, cls, 0):
            self.violations.append(f"{module.name}:{call.lineno}: {ast.unparse(statement)[:120]}")

    def _safe(
        self,
        module: _Module,
        node: ast.expr,
        scopes: Scopes,
        cls: ast.ClassDef | None,
        depth: int,
        index: int | None = None,
    ) -> bool:
        if depth > 12:
            return False

        def again(expr: ast.expr) -> bool:
            return self._safe(module, expr, scopes, cls, depth + 1)

        if index is not None:
            if isinstance(node, ast.Tuple) and index < len(node.elts):
                return again(node.elts[index])
            if isinstance(node, ast.Call):
                return self._returns_safe(module, node, index, depth)
            return False
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str)
        if isinstance(node, ast.Call):
            func = node.func
            if _is_sql_text(func):
                (text,) = node.args
                return again(text) or (module.name, ast.unparse(text)) in _TRUSTED_TEXT
            if _attr_name(func) in _QUOTING:
                return True  # psycopg quotes whatever they hold
            if isinstance(func, ast.Attribute) and func.attr in {"format", "join"}:
                parts = [*node.args, *(k.value for k in node.keywords)]
                return again(func.value) and all(_quoted_map(p) or again(p) for p in parts)
            return self._returns_safe(module, node, None, depth)
        if isinstance(node, ast.Name):
            return self._name_safe(module, node.id, scopes, cls, depth)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and cls is not None
        ):
            return self._attribute_safe(module, node.attr, cls, depth)
        # f-strings, % and + (of constants too: "a" "b" is one constant already),
        # subscripts, anything else: not provably written in the source.
        return False

    def _name_safe(
        self, module: _Module, name: str, scopes: Scopes, cls: ast.ClassDef | None, depth: int
    ) -> bool:
        for position in range(len(scopes) - 1, -1, -1):
            function = scopes[position]
            bound = _assignments(function, name)
            if bound:
                return all(
                    value is not None
                    and self._safe(module, value, scopes[: position + 1], cls, depth + 1, index)
                    for value, index in bound
                )
            arguments = function.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            if any(argument.arg == name for argument in every):
                return False  # whatever the caller passed
        if name in module.constants:
            return self._safe(module, module.constants[name], (), None, depth + 1)
        return False

    def _attribute_safe(self, module: _Module, name: str, cls: ast.ClassDef, depth: int) -> bool:
        values = [
            (method, assign.value)
            for method in cls.body
            if isinstance(method, Function)
            for assign in ast.walk(method)
            if isinstance(assign, ast.Assign)
            for target in assign.targets
            if isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
            and target.attr == name
        ]
        return bool(values) and all(
            self._safe(module, value, (method,), cls, depth + 1) for method, value in values
        )

    def _returns_safe(self, module: _Module, call: ast.Call, index: int | None, depth: int) -> bool:
        target = self._function(module, call.func)
        if target is None:
            return False
        owner, function = target
        returns = [r.value for r in ast.walk(function) if isinstance(r, ast.Return)]
        return bool(returns) and all(
            value is not None and self._safe(owner, value, (function,), None, depth + 1, index)
            for value in returns
        )

    def _function(self, module: _Module, func: ast.expr) -> tuple[_Module, Function] | None:
        if not isinstance(func, ast.Name):
            return None
        if func.id in module.functions:
            return module, module.functions[func.id]
        if func.id in module.imported:
            file, name = module.imported[func.id]
            owner = self.modules.get(file)
            if owner is not None and name in owner.functions:
                return owner, owner.functions[name]
        return None


def _quoted_map(node: ast.expr) -> bool:
    # map(sql.Identifier, names): each name quoted.
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "map"
        and bool(node.args)
        and _attr_name(node.args[0]) in _QUOTING
    )


def _attr_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _is_sql_text(func: ast.expr) -> bool:
    # sql.SQL(...) (or SQL imported bare): its argument is sent as written.
    return _attr_name(func) == "SQL"


def _check_sources(sources: dict[str, str]) -> _SqlChecker:
    checker = _SqlChecker({name: _parse_module(name, text) for name, text in sources.items()})
    checker.run()
    return checker


def test_every_sql_statement_of_the_package_is_parameterised() -> None:
    sources = {
        path.relative_to(PACKAGE).as_posix(): path.read_text()
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    checker = _check_sources(sources)
    assert checker.violations == []
    # The walk found the statements (store, migrate, reconcile, evict, loaders, demo...).
    assert checker.checked >= 20
    # The migrations' only placeholder is the schema, filled by sql.Identifier.
    for migration in migrations():
        fields = {f for _, f, _, _ in string.Formatter().parse(migration.text) if f is not None}
        assert fields <= {"schema"}, migration.name


@pytest.mark.parametrize(
    "source",
    [
        'def f(conn, name):\n    conn.execute(f"SELECT * FROM t WHERE a = {name}")',
        'def f(conn, name):\n    conn.execute("SELECT * FROM t WHERE a = %s" % name)',
        'def f(conn, name):\n    conn.execute("SELECT * FROM t WHERE a = {}".format(name))',
        'def f(conn, name):\n    conn.execute("SELECT * FROM " + name)',
        'def f(conn, name):\n    query = "SELECT * FROM " + name\n    conn.execute(query)',
        "def f(conn, query):\n    conn.execute(query)",
        'def f(cur, t):\n    cur.executemany(f"INSERT INTO {t} VALUES (%s)", [])',
        'def f(cur, t):\n    with cur.copy(f"COPY {t} FROM STDIN"):\n        pass',
        'from psycopg import sql\ndef f(conn, t):\n    conn.execute(sql.SQL(f"SELECT {t}"))',
        'from psycopg import sql\ndef f(conn, t):\n    conn.execute(sql.SQL("SELECT {}").format(sql.SQL(t)))',
        "class C:\n    def __init__(self, t):\n        self.q = 'SELECT ' + t\n"
        "    def run(self, conn):\n        conn.execute(self.q)",
        "def q(t):\n    return 'SELECT ' + t\ndef f(conn, t):\n    conn.execute(q(t))",
    ],
)
def test_the_sql_check_catches_formatted_statements(source: str) -> None:
    checker = _check_sources({"bad.py": source})
    assert checker.violations


def test_the_sql_check_accepts_parameterised_statements() -> None:
    source = (
        "from psycopg import sql\n"
        "QUERY = 'SELECT 1'\n"
        "def q(schema):\n"
        "    return sql.SQL('SELECT * FROM {}.t WHERE a = %s').format(sql.Identifier(schema))\n"
        "def f(conn, schema, a):\n"
        "    conn.execute('SELECT * FROM t WHERE a = %s', [a])\n"
        "    conn.execute(QUERY)\n"
        "    conn.execute(q(schema), [a])\n"
        "    cols = sql.SQL(', ').join(map(sql.Identifier, ['a', 'b']))\n"
        "    conn.execute(sql.SQL('SELECT {} FROM {}').format(cols, sql.Identifier(schema)))\n"
    )
    checker = _check_sources({"good.py": source})
    # Four statements, three of them built with sql.SQL.
    assert (checker.checked, checker.violations) == (7, [])


# --- identity --------------------------------------------------------------------------------------

# What a client may send to pose as someone else.
SPOOFED = {
    "X-Account-Id": VICTIM,
    "X-User-Id": VICTIM,
    "X-Forwarded-For": VICTIM,
    "X-Forwarded-User": VICTIM,
    "X-Real-IP": "10.0.0.1",
    "Forwarded": f"for={VICTIM}",
}
TOKENS = {"alice-token": "alice", "bob-token": "bob"}


def _bearer_account(scope: dict[str, Any]) -> str | None:
    """The application's own authentication: a token it issued."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value.startswith(b"Bearer "):
            return TOKENS.get(value[7:].decode("latin-1"))
    return None


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _as(token: str) -> dict[str, str]:
    return {**SPOOFED, "Authorization": f"Bearer {token}"}


def test_no_gate_has_an_identity_by_default() -> None:
    for kind in (CreditGate, CreditDependency):
        parameters = inspect.signature(kind).parameters
        assert parameters["identify"].default is inspect.Parameter.empty, kind
        # A client's Idempotency-Key header is used only when the app says so.
        assert parameters["idempotency_key"].default is None, kind


async def test_the_middleware_charges_only_whom_identify_names(
    arc: AsyncRedCredit, settings: Settings, redis_client: redis.Redis
) -> None:
    gate = CreditGate(
        _ok,
        client=arc,
        identify=_bearer_account,
        routes=[Route("POST", "/v1/images", cost=10, messages=0)],
    )
    transport = httpx.ASGITransport(app=gate, client=("10.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://gate") as http:
        spoofing = await http.post("/v1/images", headers=SPOOFED)
        assert spoofing.status_code == 401
        assert (await http.post("/v1/images", headers=_as("alice-token"))).status_code == 200
        # The same Idempotency-Key header twice: not configured, so both are charged.
        for _ in range(2):
            response = await http.post(
                "/v1/images", headers={**_as("bob-token"), "Idempotency-Key": "same"}
            )
            assert response.status_code == 200
    keys = KeySpace(settings.versioned_prefix, settings.partitions)
    assert not redis_client.exists(keys.for_account(VICTIM).hash)
    assert (await arc.balance("alice")).credits == 90
    assert (await arc.balance("bob")).credits == 80
    assert gate.stats.unidentified == 1


async def test_a_client_idempotency_key_never_replays_another_accounts_charge(
    arc: AsyncRedCredit,
) -> None:
    def header_key(scope: dict[str, Any]) -> str | None:
        return dict(scope["headers"]).get(b"idempotency-key", b"").decode() or None

    gate = CreditGate(
        _ok,
        client=arc,
        identify=_bearer_account,
        idempotency_key=header_key,
        routes=[Route("POST", "/v1/images", cost=10, messages=0)],
    )
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="http://gate") as http:
        for token in ("alice-token", "alice-token", "bob-token"):
            headers = {**_as(token), "Idempotency-Key": "order-1"}
            assert (await http.post("/v1/images", headers=headers)).status_code == 200
    # Alice's retry replays her own charge; Bob's request with her key is his own.
    assert (await arc.balance("alice")).credits == 90
    assert (await arc.balance("bob")).credits == 90


async def test_the_fastapi_dependency_charges_only_whom_identify_names(
    arc: AsyncRedCredit, settings: Settings, redis_client: redis.Redis
) -> None:
    def current_account(request: Request) -> str | None:
        return _bearer_account(request.scope)

    app = FastAPI()
    add_problem_handler(app)
    charge = gate(arc, identify=current_account, cost=10, messages=0)

    @app.post("/v1/images", dependencies=[Depends(charge)])
    async def images() -> dict[str, str]:
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        assert (await http.post("/v1/images", headers=SPOOFED)).status_code == 401
        answer = await http.post("/v1/images", headers=_as("alice-token"))
    assert answer.headers["X-Credits-Remaining"] == "90"
    assert (await arc.balance("alice")).credits == 90
    keys = KeySpace(settings.versioned_prefix, settings.partitions)
    assert not redis_client.exists(keys.for_account(VICTIM).hash)


# --- secrets -------------------------------------------------------------------------------------


def _error_text(error: BaseException) -> str:
    """Everything a log or a crash would show of an error: message, repr, chained causes."""
    return "".join(traceback.format_exception(error)) + repr(error)


def _assert_hidden(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} shown in: {text[:2000]}"


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    lines = []
    for record in caplog.records:
        lines.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            lines.append(_error_text(record.exc_info[1]))
    return "\n".join(lines)


def _with_password(url: str, password: str) -> tuple[str, str]:
    """``url`` with ``password`` unless it has one already; and the password it carries."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), password


def test_settings_never_show_passwords() -> None:
    settings = Settings(
        redis_url="rediss://app:redis-pw@cache:6380/0?ssl_ca_certs=/etc/ca.pem",
        database_url="postgresql://app:pg-pw@db:5432/app?sslmode=verify-full",
    )
    shown = [
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        json.dumps(settings.model_dump(mode="json")),
        repr(settings.model_dump()),
    ]
    for text in shown:
        _assert_hidden(text, "redis-pw", "pg-pw")
        assert "rediss://app:***@cache:6380/0" in text  # still says where it points
    # The values themselves are intact, and a copy for a child process can keep them.
    assert settings.redis_url is not None and "redis-pw" in settings.redis_url
    revealed = settings.model_dump_json(context={"reveal_secrets": True})
    assert Settings.model_validate_json(revealed) == settings
    # Passwords in the query (redis-py and libpq read ?password=) and in libpq's key=value form.
    other = Settings(
        redis_url="redis://cache:6379/0?password=query-pw",
        database_url="host=db user=app password='kv pw' dbname=app",
    )
    _assert_hidden(repr(other) + other.model_dump_json(), "query-pw", "kv pw")
    assert masked_url("postgresql://app:p%40ss@db/app") == "postgresql://app:***@db/app"


@pytest.mark.parametrize(
    ("values", "secrets"),
    [
        # A valid URL beside an invalid setting: pydantic's error would quote every input.
        (
            {"redis_url": "redis://:redis-pw@cache/0", "database_url": "postgresql://a:pg-pw@db/x",
             "default_plan": "nope"},
            ["redis-pw", "pg-pw"],
        ),
        # libpq quotes the token it cannot read: here, the password.
        ({"database_url": "postgresql://app:pg%zz-pw@db/app"}, ["pg%zz-pw", "zz-pw"]),
        # An unencoded "@": libpq would take the rest of the password for the host.
        ({"database_url": "postgresql://app:pg@tail-pw@db/app"}, ["tail-pw"]),
        ({"database_url": "host=db password=kv-pw user"}, ["kv-pw"]),
        ({"redis_url": "redis://:redis-pw@cache:notaport/0"}, ["redis-pw"]),
        ({"redis_url": "redis://:redis-pw@cache/0?ssl_cert_reqs=none"}, ["redis-pw"]),
    ],
)  # fmt: skip
def test_invalid_settings_never_show_passwords(
    values: dict[str, Any], secrets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as from_arguments:
        Settings(**values)
    _assert_hidden(_error_text(from_arguments.value), *secrets)
    with pytest.raises(ValueError) as validated:
        Settings.model_validate(values)
    _assert_hidden(_error_text(validated.value), *secrets)
    for name, value in values.items():
        monkeypatch.setenv(f"REDCREDIT_{name.upper()}", value)
    with pytest.raises(ConfigError) as from_environment:
        Settings()
    _assert_hidden(_error_text(from_environment.value), *secrets)


async def test_redis_connection_failures_never_show_the_password(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dead = settings.model_copy(
        update={"redis_url": f"redis://app:dead-redis-pw@127.0.0.1:{free_port()}/0"}
    )
    with RedCredit(settings=dead) as rc, pytest.raises(BackendUnavailable) as sync_error:
        rc.spend("x", cost=1)
    async with AsyncRedCredit(settings=dead) as arc:
        with pytest.raises(BackendUnavailable) as async_error:
            await arc.reserve("x", 1)
    for error in (sync_error.value, async_error.value):
        assert "unreachable" in str(error)
        _assert_hidden(_error_text(error), "dead-redis-pw")
    _assert_hidden(_log_text(caplog), "dead-redis-pw")


def test_postgres_connection_failures_never_show_the_password(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"postgresql://app:dead-pg-pw@127.0.0.1:{free_port()}/app"
    dead = settings.model_copy(update={"database_url": url})
    # A pool of the test's own, to wait half a second instead of psycopg_pool's 30.
    pool: ConnectionPool[Any] = ConnectionPool(url, min_size=1, timeout=0.5, open=True)
    loader = PostgresLoader(dead, pool=pool)
    with (
        RedCredit(settings=dead, loader=loader) as rc,
        pytest.raises((RedCreditError, psycopg.Error)) as failed,
    ):
        rc.spend("never-seen", cost=1)  # an unknown account is loaded from PostgreSQL
    pool.close()
    _assert_hidden(_error_text(failed.value), "dead-pg-pw")
    log = _log_text(caplog)
    assert "Connection refused" in log  # the pool said why, without the password
    _assert_hidden(log, "dead-pg-pw")


def test_cli_errors_never_show_the_passwords(
    pg_settings: Settings,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    assert pg_settings.database_url is not None
    live_pg, pg_secret = _with_password(pg_settings.database_url, "cli-pg-pw")
    dead_port = free_port()
    dead_pg = f"postgresql://app:cli-pg-pw@127.0.0.1:{dead_port}/app"
    dead_redis = f"redis://app:cli-redis-pw@127.0.0.1:{dead_port}/0"
    live_redis = redis_url
    cases = [
        (dead_redis, dead_pg, ["sync", "--status"], "Redis is unreachable"),
        (dead_redis, dead_pg, ["reconcile"], "connection"),
        (dead_redis, dead_pg, ["migrate"], "connection"),
        # PostgreSQL answers, Redis does not: reconcile and evict talk to Redis directly.
        (dead_redis, live_pg, ["reconcile"], "Redis is unreachable"),
        (dead_redis, live_pg, ["evict"], "Redis is unreachable"),
        (live_redis, dead_pg, ["evict"], "connection"),
    ]
    for name in [n for n in os.environ if n.upper().startswith("REDCREDIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("REDCREDIT_KEY_PREFIX", pg_settings.key_prefix)
    monkeypatch.setenv("REDCREDIT_PG_SCHEMA", pg_settings.pg_schema)
    for redis_at, pg_at, command, reason in cases:
        monkeypatch.setenv("REDCREDIT_REDIS_URL", redis_at)
        monkeypatch.setenv("REDCREDIT_DATABASE_URL", pg_at)
        code = cli_main(command)
        out, err = capsys.readouterr()
        assert code == 3, (command, out, err)  # a server unreachable
        assert err.startswith("redcredit: ") and reason in err, (command, err)
        _assert_hidden(out + err, "cli-redis-pw", pg_secret)
    _assert_hidden(_log_text(caplog), "cli-redis-pw", pg_secret)


def test_syncer_logs_postgres_errors_without_the_password(
    rc: RedCredit,
    settings: Settings,
    postgres_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rc.spend("synced", cost=1)  # a journal entry to persist
    # PostgreSQL down.
    dead_url = f"postgresql://app:sync-dead-pw@127.0.0.1:{free_port()}/app"
    pool: ConnectionPool[Any] = ConnectionPool(dead_url, min_size=1, timeout=0.5, open=True)
    down = settings.model_copy(update={"database_url": dead_url})
    with Syncer(down, pool=pool) as syncer:
        assert syncer.tick(budget_s=1) == 0
    pool.close()
    rc.spend("synced", cost=1)  # with the entry the first syncer handed back
    # PostgreSQL up, refusing the statement: the schema was never migrated.
    live_url, live_secret = _with_password(postgres_url, "sync-live-pw")
    unmigrated = settings.model_copy(
        update={"database_url": live_url, "pg_schema": "never_migrated"}
    )
    with Syncer(unmigrated) as syncer:
        assert syncer.tick(budget_s=1) == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "redcredit.ledger.syncer"]
    failures = [m for m in messages if "sync failed" in m]
    assert len(failures) == 2, messages
    assert "does not exist" in failures[1]
    _assert_hidden(_log_text(caplog), "sync-dead-pw", live_secret)


@pytest.mark.parametrize(
    ("password", "text", "shown"),
    [
        # A short password is masked where it stands alone, not inside words.
        (
            "a",
            "Redis says a is wrong for redis://:a@host:1",
            "Redis says *** is wrong for redis://:***@host:1",
        ),
        ("ab", "login ab refused (about abc)", "login *** refused (about abc)"),
        # A long one wherever it appears, even glued to other characters.
        ("hunter2hunter2", "xhunter2hunter2y", "x***y"),
    ],
)
def test_a_password_is_masked_and_the_message_stays_readable(
    password: str, text: str, shown: str
) -> None:
    from redcredit.secrets import without_secrets

    assert without_secrets(text, f"redis://:{password}@host:1") == shown
