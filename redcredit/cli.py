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
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING

import psycopg

from .config import Settings
from .errors import RedCreditError

if TYPE_CHECKING:
    from .syncer import Syncer

__all__ = ["main"]


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_toml(args.config) if args.config else Settings()


def _demo(args: argparse.Namespace) -> int:
    # Imported late: keeps `redcredit --help` fast.
    from .demo import run_demo

    return run_demo(serve=not args.no_serve, port=args.port, serve_seconds=args.serve_seconds)


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate
    from .pgloader import require_database_url

    settings = _settings(args)
    with psycopg.connect(require_database_url(settings), autocommit=True) as conn:
        applied = migrate(conn, settings.pg_schema)
    done = ", ".join(map(str, applied)) if applied else "none, already up to date"
    print(f"schema {settings.pg_schema}: migrations applied: {done}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    from .syncer import Syncer

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
    from .backend import require_url, sync_client
    from .pgloader import require_database_url
    from .reconcile import reconcile

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
    from .backend import require_url, sync_client
    from .evict import evict_idle
    from .pgloader import require_database_url

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
    demo.add_argument("--port", type=int, default=0, help="port of the chat API (default: free)")
    demo.add_argument("--serve-seconds", type=float, help="stop serving after this long")
    demo.set_defaults(handler=_demo)
    commands.add_parser(
        "migrate", help="create or upgrade the PostgreSQL schema (safe to run twice)"
    ).set_defaults(handler=_migrate)
    sync = commands.add_parser("sync", help="persist the journal to PostgreSQL, continuously")
    sync.add_argument("--status", action="store_true", help="print the lag and exit")
    sync.add_argument("--json", action="store_true", help="with --status: print JSON")
    sync.add_argument("--once", action="store_true", help="drain what is there, then exit")
    sync.add_argument("--timeout", type=float, default=300.0, help="with --once: seconds")
    sync.set_defaults(handler=_sync)
    reconcile = commands.add_parser(
        "reconcile", help="compare Redis with PostgreSQL and the journal; exit 1 on drift"
    )
    reconcile.add_argument("--sample", type=int, help="check this many random accounts")
    reconcile.set_defaults(handler=_reconcile)
    evict = commands.add_parser(
        "evict", help="drop idle accounts that PostgreSQL holds in full from Redis"
    )
    evict.add_argument("--idle", type=int, default=86_400, help="seconds idle (default a day)")
    evict.set_defaults(handler=_evict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (RedCreditError, psycopg.Error) as exc:
        print(f"redcredit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
