"""``redcredit demo``: a short scripted scenario on a real (embedded) Redis."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import uvicorn
from psycopg import sql

from ..backends.migrate import migrate
from ..clients.sync_client import RedCredit
from ..config import Settings
from ..costs import CostTable
from ..errors import RedCreditError
from ..ledger.syncer import Syncer
from ..results import Balance
from ..servers.postgres import EmbeddedPostgres
from ..servers.redis import EmbeddedRedis
from ..servers.spawn import free_port
from .app import build_app, demo_settings

__all__ = ["run_demo"]

DEMO_COSTS = {"image": 5, "chat": 2, "document": {"base": 2, "per_unit": 1, "unit": "pages"}}


class Table:
    """Rows printed as they happen, so a slow step (waiting for a lease) shows progress."""

    def __init__(self, headers: tuple[str, ...], widths: tuple[int, ...]) -> None:
        self.widths = widths
        print(self._format(headers))
        print(self._format(tuple("-" * w for w in widths)))

    def add(self, *cells: object) -> None:
        print(self._format(tuple(str(c) for c in cells)), flush=True)

    def _format(self, row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, self.widths, strict=True))


@contextlib.contextmanager
def _redis_url(settings: Settings) -> Iterator[str]:
    if settings.redis_url:
        yield settings.redis_url
        return
    with EmbeddedRedis() as server:
        print(f"No REDCREDIT_REDIS_URL set: started an embedded Redis at {server.url}")
        yield server.url


@contextlib.contextmanager
def _database_url(settings: Settings) -> Iterator[str]:
    if settings.database_url:
        yield settings.database_url
        return
    with EmbeddedPostgres() as server:
        print(f"No REDCREDIT_DATABASE_URL set: started an embedded PostgreSQL at {server.url}")
        yield server.url


def _hold_until_killed(settings_json: str, account: str, ready: Any) -> None:
    client = RedCredit(settings=Settings.model_validate_json(settings_json))
    with client.reservation(account, 15, ttl=2) as lease:
        ready.put(lease.reservation.deadline_ms)
        time.sleep(3600)


def _state(balance: Balance) -> tuple[str, str, str]:
    credits = "unlimited" if balance.unlimited else str(balance.credits)
    return credits, str(balance.chat_messages), str(balance.held)


def run_demo(*, serve: bool = True, port: int = 0, serve_seconds: float | None = None) -> int:
    """Plays the scenario, then (``serve``) serves the chat API until Ctrl-C."""
    base = Settings()
    with _redis_url(base) as url, _database_url(base) as database_url:
        settings = base.model_copy(
            update={
                "redis_url": url,
                "database_url": database_url,
                "free_credits": 20,
                "free_chat_messages": 3,
                "costs": CostTable.from_mapping(DEMO_COSTS),
                "sync_interval": timedelta(milliseconds=100),
            }
        )
        with psycopg.connect(database_url, autocommit=True) as conn:
            applied = migrate(conn, settings.pg_schema)
        print(f"Schema {settings.pg_schema!r} migrated (versions applied: {applied or 'none'}).")
        print("Syncer started: it persists the journal to PostgreSQL in the background.\n")
        syncer = Syncer(settings)
        syncer.start()
        run = uuid.uuid4().hex[:4]
        ada, bob, cyd = f"ada-{run}", f"bob-{run}", f"cyd-{run}"
        with RedCredit(settings=settings) as rc:
            table = Table(
                ("step", "call", "outcome", "credits", "chat msgs", "held"),
                (4, 56, 34, 9, 9, 4),
            )
            step = iter(range(1, 100))

            def show(call: str, action: Callable[[], object], account: str) -> None:
                try:
                    outcome = _describe(action())
                except RedCreditError as refused:
                    outcome = f"refused: {type(refused).__name__}"
                table.add(next(step), call, outcome, *_state(rc.balance(account)))

            show(f"balance({ada!r})  # new account", lambda: "opened with the free tier", ada)
            for _ in range(5):
                show(f"spend({ada!r}, 'image')  # costs 5", lambda: rc.spend(ada, "image"), ada)
            pay = f"pay_{run}"
            for _ in range(2):
                show(
                    f"grant({ada!r}, 30, idempotency_key={pay!r})",
                    lambda: rc.grant(ada, 30, idempotency_key=pay),
                    ada,
                )
            show(f"chat_turn({ada!r}, 'chat')", lambda: rc.chat_turn(ada, "chat"), ada)
            show(
                f"spend({ada!r}, 'document', units=12)",
                lambda: rc.spend(ada, "document", units=12),
                ada,
            )
            show(f"set_plan({bob!r}, 'paid')", lambda: rc.set_plan(bob, "paid"), bob)
            show(f"spend({bob!r}, cost=1000)", lambda: rc.spend(bob, cost=1000), bob)

            with rc.reservation(ada, 10) as lease:
                table.add(next(step), f"reservation({ada!r}, 10)  # stream starts", "holding 10",
                          *_state(rc.balance(ada)))  # fmt: skip
                for _token in range(7):
                    lease.add(1)
            table.add(next(step), "  ...stream used 7 tokens, block exits",
                      _describe(lease.settlement), *_state(rc.balance(ada)))  # fmt: skip

            rc.grant(cyd, 10)
            context = multiprocessing.get_context("spawn")
            ready = context.Queue()
            holder = context.Process(
                target=_hold_until_killed,
                args=(settings.model_dump_json(context={"reveal_secrets": True}), cyd, ready),
            )
            holder.start()
            ready.get(timeout=30)
            table.add(next(step), f"child process: reservation({cyd!r}, 15, ttl=2)",
                      "holding 15", *_state(rc.balance(cyd)))  # fmt: skip
            assert holder.pid is not None
            os.kill(holder.pid, signal.SIGKILL)
            holder.join()
            killed_at = rc.balance(cyd)
            table.add(next(step), "  kill -9 the child (no release, no settle)",
                      "nothing of ours is running", *_state(killed_at))  # fmt: skip
            while (balance := rc.balance(cyd)).held:
                time.sleep(0.05)
            waited = (balance.server_time_ms - killed_at.server_time_ms) / 1000
            table.add(next(step), "  ...the lease's deadline passes",
                      f"credits back after {waited:.1f} s", *_state(balance))  # fmt: skip

            _burst_and_drain(rc, syncer, run)
        syncer.stop()
        syncer.drain()
        _show_ledger(settings, ada)
        if serve:
            http_settings = demo_settings(settings)
            syncer.start()
            try:
                _serve(http_settings, run, port, serve_seconds)
            finally:
                syncer.stop()
                syncer.drain()
        syncer.close()
    return 0


def _serve(settings: Settings, run: str, port: int, serve_seconds: float | None) -> None:
    alice, broke, bursty = f"alice-{run}", f"broke-{run}", f"bursty-{run}"
    with RedCredit(settings=settings) as rc:
        rc.balance(alice)
        rc.correct(broke, -298)  # 2 credits left: a completion (5) is refused
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    auth = "-H 'Authorization: Bearer {}'"
    print(
        f"""
The chat API is served at {base} — credits, chat messages, 30 requests/min
(bursts of 5) and 3,000 tokens/min, through the ASGI middleware. Try:

  # a turn that streams 30 tokens, settled at 30 credits
  curl -N -X POST {base}/v1/chat {auth.format(alice)} -d '{{"max_tokens": 30}}'

  # refused with 402: not enough credits (problem+json body)
  curl -i -X POST {base}/v1/complete {auth.format(broke)}

  # a burst refused with 429 and Retry-After after 5 requests
  for i in 1 2 3 4 5 6 7 8; do curl -s -o /dev/null -w '%{{http_code}} ' \\
    -X POST {base}/v1/complete {auth.format(bursty)}; done; echo

  # a stream cut off after a second: charged for the ~20 tokens it received
  curl -N --max-time 1 -X POST {base}/v1/chat {auth.format(alice)} -d '{{"max_tokens": 100}}'

  # the account, and its ledger in PostgreSQL
  curl {base}/v1/account {auth.format(alice)}
  curl {base}/v1/ledger {auth.format(alice)}

Stop with Ctrl-C.""",
        flush=True,
    )
    config = uvicorn.Config(
        build_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)

    async def serve_until_stopped() -> None:
        if serve_seconds is not None:
            asyncio.get_running_loop().call_later(
                serve_seconds, lambda: setattr(server, "should_exit", True)
            )
        await server.serve()

    asyncio.run(serve_until_stopped())


def _burst_and_drain(rc: RedCredit, syncer: Syncer, run: str) -> None:
    accounts = [f"load-{run}-{i}" for i in range(200)]
    for account in accounts:
        rc.grant(account, 1_000)
    syncer.stop()
    print(
        "\nThe syncer is stopped (as when PostgreSQL is down) during a burst of 5,000 spends "
        "on 200 accounts:\nthe journal queues up in Redis, and nothing is lost."
    )
    for i in range(5_000):
        rc.spend(accounts[i % len(accounts)], cost=1)
    print("Syncer started again; its lag falls to zero:")
    print(f"  {'t (s)':>6}  {'waiting':>8}  {'oldest (s)':>10}  {'persisted':>9}")
    syncer.start()
    began = time.monotonic()
    while True:
        lag = syncer.lag()
        age = "-" if lag.oldest_age_ms is None else f"{lag.oldest_age_ms / 1000:.2f}"
        elapsed = time.monotonic() - began
        print(f"  {elapsed:>6.2f}  {lag.entries:>8}  {age:>10}  {syncer.applied:>9}")
        if lag.caught_up:
            break
        time.sleep(0.05)


def _show_ledger(settings: Settings, account: str) -> None:
    assert settings.database_url is not None
    schema = sql.Identifier(settings.pg_schema)
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            sql.SQL(
                "SELECT seq, op, credit_delta, chat_delta, credits_after, chat_after, feature "
                "FROM {}.ledger WHERE account = %s ORDER BY seq"
            ).format(schema),
            [account],
        ).fetchall()
        total = conn.execute(sql.SQL("SELECT COUNT(*) FROM {}.ledger").format(schema)).fetchone()
    print(f"\nPostgreSQL ledger of {account!r} ({total[0] if total else 0} rows in all):")
    table = Table(("seq", "op", "credits", "chat", "credits after", "chat after", "feature"),
                  (4, 8, 8, 5, 13, 10, 10))  # fmt: skip
    for seq, op, dc, dm, credits, chat, feature in rows:
        table.add(seq, op, f"{dc:+d}", f"{dm:+d}", credits, chat, feature or "")
    print("\nThe ledger sums to the balance; `redcredit reconcile` checks that for every account.")


def _describe(result: object) -> str:
    name = type(result).__name__
    if isinstance(result, str):
        return result
    fields: dict[str, Any] = {
        key: getattr(result, key) for key in getattr(result, "__dataclass_fields__", {})
    }
    if name == "SpendResult":
        left = fields["credits_remaining"]
        text = "ok, unlimited (usage journaled)" if left is None else f"ok, {left} left"
    elif name == "BalanceChange":
        text = f"granted, now {fields['credits']}"
    elif name == "PlanChange":
        text = f"plan {fields['previous_plan']} -> {fields['plan']}"
    elif name == "Settlement":
        text = f"{fields['outcome']}: charged {fields['charged']}"
    else:
        text = name
    return text + (" (replayed)" if fields.get("replayed") else "")
