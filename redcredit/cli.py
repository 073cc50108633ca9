"""The ``redcredit`` command.

Settings come from ``REDCREDIT_*`` environment variables, or from a TOML file
given with ``--config`` (environment variables still take precedence).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Final

import psycopg
from redis.exceptions import RedisError

from .backends.redis import translated
from .config import Settings
from .errors import ConfigError, RedCreditError
from .secrets import without_secrets

if TYPE_CHECKING:
    from .ledger.syncer import Syncer

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_toml(args.config) if args.config else Settings()
    # Kept for main(), which takes the URLs' passwords out of any error it prints.
    args.settings = settings
    return settings


def _demo(args: argparse.Namespace) -> int:
    if args.config:
        # Refused rather than ignored: the demo brings its own prices and balances.
        raise ConfigError(
            "the demo does not read --config; it takes REDCREDIT_REDIS_URL and "
            "REDCREDIT_DATABASE_URL from the environment, or starts servers of its own"
        )
    # Imported late: keeps `redcredit --help` fast.
    from .demo.scenario import run_demo

    return run_demo(serve=not args.no_serve, port=args.port, serve_seconds=args.serve_seconds)


def _migrate(args: argparse.Namespace) -> int:
    from .backends.migrate import migrate
    from .backends.postgres_loader import require_database_url

    settings = _settings(args)
    with psycopg.connect(require_database_url(settings), autocommit=True) as conn:
        applied = migrate(conn, settings.pg_schema)
    done = ", ".join(map(str, applied)) if applied else "none, already up to date"
    print(f"schema {settings.pg_schema}: migrations applied: {done}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from .ledger.syncer import Syncer

    syncer = Syncer(_settings(args))
    try:
        if args.status:
            lag = syncer.lag()
            if args.json:
                print(json.dumps(asdict(lag)))
            else:
                age = "-" if lag.oldest_age_ms is None else f"{lag.oldest_age_ms / 1000:.1f} s"
                print(f"waiting: {lag.entries}  in flight: {lag.pending}  oldest: {age}")
            return 0
        if args.once:
            lag = syncer.drain(timeout_s=args.timeout)
            print(f"persisted {syncer.applied} entries; {lag.entries} still waiting")
            return 0 if lag.caught_up else 1
        return _sync_forever(syncer)
    finally:
        syncer.close()


def _sync_forever(syncer: Syncer) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"syncing as {syncer.consumer}; stop with SIGTERM or Ctrl-C", flush=True)
    with syncer.running():
        stop.wait()
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from .backends.postgres_loader import require_database_url
    from .backends.redis import require_url, sync_client
    from .ledger.reconcile import reconcile

    settings = _settings(args)
    client = sync_client(settings, require_url(settings))
    try:
        with psycopg.connect(require_database_url(settings), autocommit=True) as conn:
            report = reconcile(settings, client, conn, sample=args.sample)
    finally:
        client.close()
    for drift in report.drift:
        print(f"DRIFT {drift.account!r}: {drift.problem}")
    print(
        f"checked {report.accounts} accounts and {report.journal_entries} unsynced journal "
        f"entries: {len(report.drift)} drifted, {len(report.in_flight)} still changing"
    )
    return 0 if report.clean else 1


def _evict(args: argparse.Namespace) -> int:
    from .backends.postgres_loader import require_database_url
    from .backends.redis import require_url, sync_client
    from .ledger.evict import evict_idle

    settings = _settings(args)
    client = sync_client(settings, require_url(settings))
    try:
        with psycopg.connect(require_database_url(settings), autocommit=True) as conn:
            report = evict_idle(settings, client, conn, idle=timedelta(seconds=args.idle))
    finally:
        client.close()
    kept = ", ".join(f"{n} {reason}" for reason, n in sorted(report.outcomes.items()))
    print(f"scanned {report.scanned} accounts: {kept or 'none'}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="redcredit",
        description="Credits, chat-message quotas and reservations for LLM products.",
    )
    parser.add_argument("--config", help="TOML file with [redcredit] and [costs] tables")
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
    commands.add_parser(
        "migrate", help="create or upgrade the PostgreSQL schema (safe to run twice)"
    ).set_defaults(handler=_migrate)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (RedCreditError, psycopg.Error, RedisError) as exc:
        # reconcile and evict talk to Redis directly: its errors get the
        # library's wording instead of a traceback.
        error = translated(exc) if isinstance(exc, RedisError) else exc
        settings: Settings | None = getattr(args, "settings", None)
        urls = (settings.redis_url, settings.database_url) if settings is not None else ()
        # One line: libpq's messages span several.
        message = " ".join(without_secrets(str(error), *urls).split())
        print(f"redcredit: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
