"""redcredit's benchmark suite: every design side by side, on the same servers, in one run.

    python -m bench                 # full mode: 5 runs of 3 s per point (~8 minutes)
    python -m bench --quick         # 3 runs of 0.3 s per point, whole run under a minute
    python -m bench --quick --only ceiling,async,memory
    python -m bench --out DIR       # results go to DIR instead of bench/results/<timestamp>/

It starts its own servers the way the tests do (``EmbeddedRedis``, and
``EmbeddedPostgres`` when a section needs one), talks to them over loopback
only, and bounds every load both in time (``--seconds`` per run) and in count
(``--max-ops`` calls per run). Sections (``--only`` takes a comma-separated list):

``ceiling``
    What Redis itself gives for redcredit's debit script: a minimal asyncio RESP
    client (replies parsed by hiredis) sending ``EVALSHA`` with the exact keys and arguments that
    ``Engine.spend`` builds, unpipelined (64 connections, one call in flight on
    each) and pipelined (16 connections, 16 calls per write); raw redis-py, one
    call per round trip, 64 callers; and ``redis-benchmark`` (or
    ``valkey-benchmark``) when one is on PATH or beside the server binary.
``async``   ``AsyncRedCredit.spend`` on one hot account at 1, 16, 64, 256 callers.
``sync``    ``RedCredit.spend`` in 1 and in 4 processes (one caller each).
``db``      the database-only design, ``UPDATE accounts SET credits = credits - $1
            WHERE id = $2 AND credits >= $1 RETURNING credits`` through a psycopg
            async pool, on one hot row and spread over 10k rows, at 1..256 callers.
            (PostgreSQL runs durably, fsync and synchronous commit on, as a system of record.)
``limits``  the ``limits`` library (limits.aio, moving window at every concurrency,
            fixed window at 64) against the same Redis.
``reserve`` a reserve -> settle cycle (two scripts), 64 callers, one account each.
``chat``    ``chat_turn`` with two rate limits configured (large, so none refuses).
``buckets`` async spend at 64 callers, plain and with 1, 8, 32 credit buckets (reserve -> settle:
            plain, 8), same run: calls/s over plain, Redis CPU per script call (commandstats).
``scopes``  the same on paths of 1 to 4 levels (the root pays), and 3 levels with 8 buckets.
``spread``  ``AsyncRedCredit.spend`` at 64 callers over 10k accounts (vs one hot one).
``syncer``  the syncer's drain rate into PostgreSQL, and the lag it reaches while
            spends run (the logic of ``bench/write_behind.py``).
``memory``  ``MEMORY USAGE`` of an idle account, and of one with an active hold
            (its hash, holds set and reservation record), plus bytes per journal entry.
``http``    the demo's ``POST /v1/complete`` with and without the middleware
            (``bench/http.py``), 16 keep-alive connections.
``cluster`` ``AsyncRedCredit.spend`` over 10k accounts on one Redis and on 3 primaries (set
            by settings alone), at 1, 64, 256 callers and 4 processes x 64: cluster / standalone.
``cluster-drain`` the syncer's drain into PostgreSQL from one Redis and from 3 primaries.

For every point it reports calls/s (median of the runs, with min-max), the
p50/p99/p99.9 latency of single calls (for pipelined points: the round trip of
the batch), the CPU of this client process (``time.process_time`` over wall
time; for the multi-process points, the sum over the processes) and the CPU of
Redis (``used_cpu_user + used_cpu_sys`` of ``INFO cpu``, before and after),
and for the ``db`` section of PostgreSQL (postmaster and backends, from
``/proc``); 100% is one core. It
prints a table, a table of ratios against the issue's targets (met / missed),
and writes ``results.json``, ``results.md`` and PNG plots (throughput and p99
against concurrency) with machine info (CPU count, Python, Redis/Valkey and
PostgreSQL versions).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .harness import Config, Results, suite_servers
from .report import machine_info, write
from .sections import NAMES, SECTIONS, Section


@dataclass
class Plan:
    cfg: Config
    sections: list[Section]
    out: Path | None


def parse(argv: list[str] | None = None) -> Plan:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 short runs per point")
    parser.add_argument("--only", default="", help="comma-separated sections: " + ",".join(NAMES))
    parser.add_argument("--runs", type=int, help="runs per point (default 3 quick, 5 full)")
    parser.add_argument("--seconds", type=float, help="seconds per run (0.3 quick, 3 full)")
    parser.add_argument("--max-ops", type=int, help="most calls per run (default 1,000,000)")
    parser.add_argument("--out", type=Path, help="output directory")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s} or set(NAMES)
    unknown = only - set(NAMES)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(NAMES)}")
    cfg = Config(
        runs=args.runs or (3 if args.quick else 5),
        seconds=args.seconds or (0.3 if args.quick else 3.0),
        max_ops=args.max_ops or 1_000_000,
        drain_entries=20_000 if args.quick else 100_000,
        quick=args.quick,
    )
    return Plan(cfg, [s for s in SECTIONS if s.name in only], args.out)


def main(argv: list[str] | None = None) -> int:
    plan = parse(argv)
    cfg = plan.cfg
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = plan.out or Path(__file__).resolve().parent / "results" / started
    needs_postgres = any(s.postgres for s in plan.sections)
    needs_cluster = any(s.cluster for s in plan.sections)
    with suite_servers(needs_postgres, needs_cluster) as (url, port, pg_url, cluster_urls):
        res = Results(started, "quick" if cfg.quick else "full", machine_info(url, pg_url))
        res.machine.update(runs=cfg.runs, seconds_per_run=cfg.seconds, max_ops=cfg.max_ops)
        for section in plan.sections:
            print(f"[{section.name}]", flush=True)
            section.run(cfg, section.servers(url, port, pg_url, cluster_urls), res)
        write(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
