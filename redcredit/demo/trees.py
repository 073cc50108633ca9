"""The demo's rows for credit buckets and trees of accounts: a promotional grant
that expires, and an organisation's pool with a user's cap refusing."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from ..clients.sync_client import RedCredit
from ..scopes import Cap, Scope

__all__ = ["play_buckets_and_tree"]

Show = Callable[[str, Callable[[], object], "str | Scope"], None]


def play_buckets_and_tree(rc: RedCredit, run: str, show: Show) -> None:
    eve = f"eve-{run}"
    show(
        "grant(eve, 25, promotional, 1 s)",
        lambda: rc.grant(eve, 25, category="promotional", expires_in=timedelta(seconds=1)),
        eve,
    )
    show("grant(eve, 10)  # never expires", lambda: rc.grant(eve, 10), eve)
    show("spend(eve, cost=5)  # promotional first", lambda: rc.spend(eve, cost=5), eve)
    time.sleep(1.1)
    show("  ...1 s later", lambda: _buckets_left(rc, eve), eve)

    org = f"acme-{run}"
    mia = Scope(org, f"research-{run}", f"mia-{run}")
    rc.attach(Scope(org, f"research-{run}"))
    rc.attach(mia)
    show("grant(acme, 100)  # the org's pool", lambda: rc.grant(org, 100), org)
    show(
        "set_cap(mia, Cap(credits=50))",
        lambda: rc.set_cap(mia, Cap(credits=50, period="day")),
        org,
    )
    for _ in range(2):
        show("spend(Scope(acme, …, mia), 40)", lambda: rc.spend(mia, cost=40), org)


def _buckets_left(rc: RedCredit, account: str) -> str:
    buckets = rc.balance(account).buckets
    live = any(b.category == "promotional" for b in buckets)
    state = "still live" if live else "expired"
    return f"promotional {state}; left: " + ", ".join(f"{b.id} {b.remaining}" for b in buckets)
