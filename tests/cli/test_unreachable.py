"""A Redis or PostgreSQL that is down: every command answers within its timeouts, with status 3."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from redcredit.cli import Exit
from tests.cli.running import clean_env, run_cli

COMMANDS = [
    ("migrate",),
    ("sync",),
    ("sync", "--once"),
    ("sync", "--status"),
    ("sync", "--status", "--json"),
    ("reconcile",),
    ("evict",),
]
PASSWORD = "not-shown-anywhere"
# The deadlines given below are 1 s (libpq rounds 1 s up to 2); psycopg's own
# default would be 130 s. The rest of the bound is the interpreter starting on
# a busy machine.
WITHIN_S = 20


@pytest.fixture(params=["refusing", "silent"])
def dead_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A port that refuses connections, or one that takes them and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        if request.param == "refusing":
            sock.close()
            yield port
            return
        # The kernel completes handshakes into the backlog; nobody accepts.
        sock.listen(64)
        yield port


def _assert_one_line_error(done, started: float, server: str) -> None:
    elapsed = time.monotonic() - started
    assert done.returncode == Exit.UNREACHABLE, (done.returncode, done.stdout, done.stderr)
    assert elapsed < WITHIN_S, elapsed
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"redcredit: {server} is unreachable at "), lines[0]
    assert PASSWORD not in done.stderr + done.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_postgres_down(
    command: tuple[str, ...], dead_port: int, redis_url: str, prefix: str
) -> None:
    env = clean_env(
        REDCREDIT_REDIS_URL=redis_url,
        REDCREDIT_KEY_PREFIX=prefix,
        REDCREDIT_DATABASE_URL=f"postgresql://redcredit:{PASSWORD}@127.0.0.1:{dead_port}/x",
        REDCREDIT_DATABASE_TIMEOUT="1",
    )
    started = time.monotonic()
    done = run_cli(*command, env=env, timeout=60)
    _assert_one_line_error(done, started, "PostgreSQL")
    if "--status" in command:
        # The lag comes from Redis alone, and is what one wants to see while PostgreSQL is down.
        assert ('"entries": 0' if "--json" in command else "waiting: 0") in done.stdout
    else:
        # Nothing claimed success: `sync --once` used to say "persisted 0 entries".
        assert done.stdout == ""


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != ("migrate",)], ids=" ".join)
def test_redis_down(
    command: tuple[str, ...], dead_port: int, postgres_url: str, pg_schema: str
) -> None:
    env = clean_env(
        REDCREDIT_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{dead_port}/0",
        REDCREDIT_REDIS_CONNECT_TIMEOUT="0.5",
        REDCREDIT_REDIS_SOCKET_TIMEOUT="0.5",
        REDCREDIT_DATABASE_URL=postgres_url,
        REDCREDIT_PG_SCHEMA=pg_schema,
    )
    started = time.monotonic()
    done = run_cli(*command, env=env, timeout=60)
    _assert_one_line_error(done, started, "Redis")
    assert done.stdout == ""


def test_help_lists_every_exit_status() -> None:
    done = run_cli("--help", env=clean_env())
    assert done.returncode == Exit.OK
    listed = done.stdout.split("exit status:")[1]
    codes = [int(line.split()[0]) for line in listed.splitlines() if line[:6].strip().isdigit()]
    assert codes == [int(code) for code in Exit]
