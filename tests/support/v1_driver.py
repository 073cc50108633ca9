"""Traffic of the previous release, for tests/ledger/test_upgrade.py, in a process of its own.

Run as ``python v1_driver.py <command> <json options>`` with ``PYTHONPATH`` at
an extracted copy of the release and the settings in ``REDCREDIT_*``
variables. It imports only what that release had (never ``tests``), and
prints one JSON document: per account, the credits and chat messages that
each successful call moved, as the call itself returned them, and the calls
the upgrade replays or finishes.

Commands:
  populate  {"accounts": [...], "paid": [...], "seed": n}: grants, spends,
            chat turns, keyed calls, reservations (live, lapsing, settled)
  evict     {}: drops every idle account without holds that PostgreSQL holds
  calls     {"calls": [{"op": name, "args": [...], "kwargs": {...},
            "offset_ms": n}, ...]}: the client's methods, one after another,
            with the server's clock moved on by ``offset_ms``; their results
  spend     {"accounts": [...], "paid": [...], "seed": n, "seconds": s,
            "stop": path, "calls": n}: a rolling upgrade's old client, until
            ``stop`` exists, ``seconds`` pass or it made ``calls`` calls
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import redcredit
from redcredit import InsufficientFunds, RedCredit, ReservationRef, Settings


class Tally:
    """What the calls returned: the moves per account, and the calls worth replaying."""

    def __init__(self, paid: set[str]) -> None:
        self.paid = paid
        self.moves: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.keyed: list[dict[str, Any]] = []
        self.refused = 0

    def moved(self, account: str, credits: int, chat: int = 0, *, spend: bool = True) -> None:
        # A bypassing plan spends nothing; grants still add to its credits.
        if spend and account in self.paid:
            return
        self.moves[account][0] += credits
        self.moves[account][1] += chat

    def keep(self, op: str, account: str, key: str, args: dict[str, Any], result: Any) -> None:
        self.keyed.append(
            {
                "op": op,
                "account": account,
                "key": key,
                "args": args,
                "result": dataclasses.asdict(result),
            }
        )

    def document(self, **more: Any) -> dict[str, Any]:
        return {"moves": dict(self.moves), "keyed": self.keyed, "refused": self.refused, **more}


def populate(rc: RedCredit, options: dict[str, Any]) -> dict[str, Any]:
    accounts: list[str] = options["accounts"]
    tally = Tally(set(options["paid"]))
    rng = random.Random(options["seed"])
    live: list[dict[str, Any]] = []
    lapsing: list[dict[str, Any]] = []
    for account in options["paid"]:
        rc.set_plan(account, "paid")
    for i, account in enumerate(accounts):
        amount = 20 + i % 7
        key = f"v1-grant-{account}"
        tally.keep(
            "grant",
            account,
            key,
            {"credits": amount},
            rc.grant(account, amount, idempotency_key=key),
        )
        tally.moved(account, amount, spend=False)
        for j in range(3):
            cost = rng.randint(1, 9)
            key = f"v1-spend-{account}-{j}"
            try:
                done = rc.spend(account, cost=cost, idempotency_key=key if j != 1 else None)
            except InsufficientFunds:
                tally.refused += 1
                continue
            tally.moved(account, -cost)
            if j != 1:
                tally.keep("spend", account, key, {"cost": cost}, done)
        key = f"v1-turn-{account}"
        try:
            turn = rc.chat_turn(account, cost=2, messages=1, idempotency_key=key)
        except InsufficientFunds:
            tally.refused += 1
        else:
            tally.moved(account, -2, -1)
            tally.keep("chat_turn", account, key, {"cost": 2, "messages": 1}, turn)
        if i % 4 == 1:
            key = f"v1-reserve-{account}"
            held = rc.reserve(account, 4, ttl=600, idempotency_key=key)
            tally.keep("reserve", account, key, {"amount": 4, "ttl": 600}, held)
            live.append({"account": account, "id": held.id, "amount": 4})
        elif i % 4 == 2:
            held = rc.reserve(account, 3, ttl=1)
            lapsing.append({"account": account, "id": held.id, "amount": 3})
        elif i % 4 == 3:
            held = rc.reserve(account, 5, ttl=600)
            key = f"v1-settle-{account}"
            settled = rc.settle(held, 3, idempotency_key=key)
            tally.moved(account, -settled.charged)
            tally.keep("settle", account, key, {"id": held.id, "actual": 3}, settled)
    return tally.document(live=live, lapsing=lapsing)


def spend(rc: RedCredit, options: dict[str, Any]) -> dict[str, Any]:
    """Keeps spending, as an old client still serving during a rolling upgrade."""
    accounts: list[str] = options["accounts"]
    tally = Tally(set(options["paid"]))
    rng = random.Random(options["seed"])
    stop = Path(options["stop"]) if "stop" in options else None
    deadline = time.monotonic() + options["seconds"]
    most = options.get("calls", 2**53)
    calls = 0
    while time.monotonic() < deadline and calls < most:
        if stop is not None and stop.exists():
            break
        account = rng.choice(accounts)
        kind = rng.random()
        calls += 1
        try:
            if kind < 0.5:
                cost = rng.randint(1, 4)
                key = f"v1-roll-{options['seed']}-{calls}" if kind < 0.2 else None
                done = rc.spend(account, cost=cost, idempotency_key=key)
                tally.moved(account, -cost)
                if key is not None:
                    tally.keep("spend", account, key, {"cost": cost}, done)
            elif kind < 0.65:
                rc.chat_turn(account, cost=1, messages=1)
                tally.moved(account, -1, -1)
            elif kind < 0.75:
                rc.grant(account, 3)
                tally.moved(account, 3, spend=False)
            else:
                held = rc.reserve(account, 3, ttl=60)
                if kind < 0.9:
                    tally.moved(account, -rc.settle(held, rng.randint(0, 5)).charged)
                else:
                    rc.release(held)
        except InsufficientFunds:
            tally.refused += 1
        time.sleep(0.002)  # a busy service, not a benchmark
    return tally.document(calls=calls)


def evict(rc: RedCredit, options: dict[str, Any]) -> dict[str, Any]:
    import psycopg

    from redcredit.ledger.evict import evict_idle

    settings = rc.settings
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        report = evict_idle(settings, None, conn, idle=timedelta(0))
    return {"outcomes": dict(report.outcomes)}


def calls(rc: RedCredit, options: dict[str, Any]) -> dict[str, Any]:
    results = []
    for call in options["calls"]:
        rc.engine.clock_offset_ms = call.get("offset_ms", 0)
        args = list(call.get("args", ()))
        if call["op"] in ("settle", "release", "extend"):
            args[0] = ReservationRef(*args[0])  # [account, id] in JSON
        done = getattr(rc, call["op"])(*args, **call.get("kwargs", {}))
        results.append(dataclasses.asdict(done) if dataclasses.is_dataclass(done) else done)
    return {"results": results}


COMMANDS = {"populate": populate, "spend": spend, "evict": evict, "calls": calls}


def main() -> None:
    command, options = sys.argv[1], json.loads(sys.argv[2])
    release = Path(options.pop("release")).resolve()
    # The test is only worth something if the old code really runs here.
    if not Path(redcredit.__file__).resolve().is_relative_to(release):
        raise SystemExit(f"imported {redcredit.__file__}, not the release at {release}")
    with RedCredit(settings=Settings()) as rc:
        print(json.dumps(COMMANDS[command](rc, options)))


if __name__ == "__main__":
    main()
