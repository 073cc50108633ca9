"""``redcredit demo``: a short scripted scenario on a real (embedded) Redis."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

import psycopg
import uvicorn

from ..backends.migrate import migrate
from ..backends.postgres import ledger_of, ledger_size
from ..clients.sync_client import RedCredit
from ..config import Settings
from ..costs import CostTable
from ..errors import CapReached, RedCreditError
from ..ledger.syncer import Syncer
from ..results import Balance
from ..scopes import Scope
from ..servers.postgres import EmbeddedPostgres
from ..servers.redis import EmbeddedRedis
from ..servers.spawn import free_port
from .app import build_app, demo_settings
from .terminal import TERMINATING, Table, handling, interrupt
from .trees import play_buckets_and_tree

__all__ = ["run_demo"]

DEMO_COSTS = {"image": 5, "chat": 2, "document": {"base": 2, "per_unit": 1, "unit": "pages"}}
_PRICES = "image 5, chat 2, document 2 + 1 a page"


@contextlib.contextmanager
def _redis_url(settings: Settings) -> Iterator[str]:
    if settings.redis_url:
        yield settings.redis_url
        return
    with EmbeddedRedis() as server:
        print(f"No REDCREDIT_REDIS_URL set: started an embedded Redis at\n  {server.url}")
        yield server.url


@contextlib.contextmanager
def _database_url(settings: Settings) -> Iterator[str]:
    if settings.database_url:
        yield settings.database_url
        return
    with EmbeddedPostgres() as server:
        print(f"No REDCREDIT_DATABASE_URL set: started an embedded PostgreSQL at\n  {server.url}")
        yield server.url


def _hold_until_killed(settings_json: str, account: str, ready: Connection) -> None:
    client = RedCredit(settings=Settings.model_validate_json(settings_json))
    with client.reservation(account, 15, ttl=2) as lease:
        ready.send(lease.reservation.deadline_ms)
        time.sleep(3600)


def _state(balance: Balance) -> tuple[str, str, str]:
    credits = "unlimited" if balance.unlimited else str(balance.credits)
    return credits, str(balance.chat_messages), str(balance.held)


def run_demo(*, serve: bool = True, port: int = 0, serve_seconds: float | None = None) -> int:
    """Plays the scenario, then (``serve``) serves the chat API until Ctrl-C (or SIGTERM)."""
    base = Settings()
    with (
        handling(TERMINATING, interrupt),
        _redis_url(base) as url,
        _database_url(base) as database_url,
    ):
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
        try:
            syncer.start()
            run = uuid.uuid4().hex[:4]
            with RedCredit(settings=settings) as rc:
                ada = _play(rc, settings, run)
                _burst_and_drain(rc, syncer, run)
            syncer.stop()
            syncer.drain()
            _show_ledger(settings, ada)
            if serve:
                syncer.start()
                try:
                    _serve(demo_settings(settings), run, port, serve_seconds)
                finally:
                    syncer.stop()
                    syncer.drain()
        finally:
            syncer.close()
    return 0


def _play(rc: RedCredit, settings: Settings, run: str) -> str:
    """The calls of the library, one row each; returns the account whose ledger is shown."""
    ada, bob, cyd, pay = f"ada-{run}", f"bob-{run}", f"cyd-{run}", f"pay_{run}"
    print(f"Accounts: ada = {ada!r}, bob = {bob!r}, cyd = {cyd!r}.")
    print(f"A payment: pay = {pay!r}. Prices: {_PRICES}.\n")
    table = Table(("call", "outcome", "credits", "msgs", "held"), (40, 31, 9, 4, 4), wrap=0)

    def show(call: str, action: Callable[[], object], account: str | Scope) -> None:
        try:
            outcome = _describe(action())
        except RedCreditError as refused:
            outcome = f"refused: {type(refused).__name__}"
            if isinstance(refused, CapReached):
                outcome += f" {refused.level}"  # the level whose cap refused
        table.add(call, outcome, *_state(rc.balance(account)))

    show("balance(ada)", lambda: "opened with the free tier", ada)
    for _ in range(5):
        show("spend(ada, 'image')", lambda: rc.spend(ada, "image"), ada)
    for _ in range(2):
        show(
            "grant(ada, 30, idempotency_key=pay)",
            lambda: rc.grant(ada, 30, idempotency_key=pay),
            ada,
        )
    show("chat_turn(ada, 'chat')", lambda: rc.chat_turn(ada, "chat"), ada)
    show(
        "spend(ada, 'document', units=12)",
        lambda: rc.spend(ada, "document", units=12),
        ada,
    )
    show("set_plan(bob, 'paid')", lambda: rc.set_plan(bob, "paid"), bob)
    show("spend(bob, cost=1000)", lambda: rc.spend(bob, cost=1000), bob)

    with rc.reservation(ada, 10) as lease:
        table.add("reservation(ada, 10)", "holding 10",
                  *_state(rc.balance(ada)))  # fmt: skip
        for _token in range(7):
            lease.add(1)
    table.add("  ...7 tokens streamed",
              _describe(lease.settlement), *_state(rc.balance(ada)))  # fmt: skip

    play_buckets_and_tree(rc, run, show)
    rc.grant(cyd, 10)
    _crash_a_holder(rc, settings, cyd, table)
    return ada


def _crash_a_holder(rc: RedCredit, settings: Settings, cyd: str, table: Table) -> None:
    """A process holding a reservation is killed: the credits come back at the deadline."""
    context = multiprocessing.get_context("spawn")
    # A pipe, not a Queue: a Queue's named semaphores outlive a demo ended by a
    # signal, and the resource tracker then warns of leaked ones.
    receiver, sender = context.Pipe(duplex=False)
    holder = context.Process(
        target=_hold_until_killed,
        args=(settings.model_dump_json(context={"reveal_secrets": True}), cyd, sender),
    )
    holder.start()
    try:
        # Ours closed, the pipe reads as ended if the child dies before it answers.
        sender.close()
        if not receiver.poll(30):
            raise RedCreditError("the child process took no reservation within 30 s")
        receiver.recv()
        table.add("reservation(cyd, 15, ttl=2)", "holding 15, in a child",
                  *_state(rc.balance(cyd)))  # fmt: skip
    finally:
        holder.kill()
        holder.join()
        holder.close()
        receiver.close()
    killed_at = rc.balance(cyd)
    table.add("  kill -9 the child", "no release, no settle",
              *_state(killed_at))  # fmt: skip
    while (balance := rc.balance(cyd)).held:
        time.sleep(0.05)
    waited = (balance.server_time_ms - killed_at.server_time_ms) / 1000
    table.add("  ...deadline passes", f"credits back after {waited:.1f} s",
              *_state(balance))  # fmt: skip


def _serve(settings: Settings, run: str, port: int, serve_seconds: float | None) -> None:
    alice, broke, bursty = f"alice-{run}", f"broke-{run}", f"bursty-{run}"
    with RedCredit(settings=settings) as rc:
        rc.balance(alice)
        rc.correct(broke, -298)  # 2 credits left: a completion (5) is refused
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    auth = "-H 'Authorization: Bearer {}'"
    # Every line fits 80 columns; the commands are continued with backslashes.
    instructions = f"""
The chat API is served at {base}: credits, chat messages,
30 requests/min (bursts of 5) and 3,000 tokens/min, through the ASGI
middleware. Try:

  # a turn that streams 30 tokens, settled at 30 credits
  curl -N -X POST {base}/v1/chat \\
    {auth.format(alice)} -d '{{"max_tokens": 30}}'

  # refused with 402: not enough credits (problem+json body)
  curl -i -X POST {base}/v1/complete \\
    {auth.format(broke)}

  # a burst refused with 429 and Retry-After after 5 requests
  for i in 1 2 3 4 5 6 7 8; do curl -s -o /dev/null -w '%{{http_code}} ' \\
    -X POST {base}/v1/complete \\
    {auth.format(bursty)}; done; echo

  # a stream cut off after a second: charged for the ~20 tokens it received
  curl -N --max-time 1 -X POST {base}/v1/chat \\
    {auth.format(alice)} -d '{{"max_tokens": 100}}'

  # the account, and its ledger in PostgreSQL
  curl {base}/v1/account {auth.format(alice)}
  curl {base}/v1/ledger {auth.format(alice)}

Stop with Ctrl-C."""
    config = uvicorn.Config(
        build_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = _AnnouncingServer(config, instructions)

    def hang_up(signum: int, frame: FrameType | None) -> None:
        server.handle_exit(signal.SIGTERM, frame)

    async def serve_until_stopped() -> None:
        if serve_seconds is not None:
            asyncio.get_running_loop().call_later(
                serve_seconds, lambda: setattr(server, "should_exit", True)
            )
        await server.serve()

    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal
    # again for the handler it found (ours, which ends the demo as Ctrl-C does). A
    # hangup it does not handle, so it is given one as a SIGTERM.
    with handling([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [], hang_up):
        asyncio.run(serve_until_stopped())


class _AnnouncingServer(uvicorn.Server):
    """Prints how to use the API once it listens, not before: a curl copied at once works."""

    def __init__(self, config: uvicorn.Config, announcement: str) -> None:
        super().__init__(config)
        self._announcement = announcement

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self._announcement, flush=True)


def _burst_and_drain(rc: RedCredit, syncer: Syncer, run: str) -> None:
    accounts = [f"load-{run}-{i}" for i in range(200)]
    for account in accounts:
        rc.grant(account, 1_000)
    syncer.stop()
    print(
        "\nThe syncer is stopped (as when PostgreSQL is down) during a burst of 5,000\n"
        "spends on 200 accounts: the journal queues up in Redis, and nothing is lost."
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
    with psycopg.connect(settings.database_url) as conn:
        rows = ledger_of(conn, settings.pg_schema, account)
        total = ledger_size(conn, settings.pg_schema)
    print(f"\nPostgreSQL ledger of {account!r} ({total} rows in all):")
    table = Table(("seq", "op", "credits", "chat", "credits after", "chat after", "feature"),
                  (4, 8, 8, 5, 13, 10, 10))  # fmt: skip
    for seq, op, dc, dm, credits, chat, feature in rows:
        table.add(seq, op, f"{dc:+d}", f"{dm:+d}", credits, chat, feature or "")
    print("\nThe ledger sums to the balance: `redcredit reconcile` checks every account.")


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
    elif name == "CapChange":
        text = "cap set"
    elif name == "Settlement":
        text = f"{fields['outcome']}: charged {fields['charged']}"
    else:
        text = name
    return text + (" (replayed)" if fields.get("replayed") else "")
