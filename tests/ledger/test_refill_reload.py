"""An account evicted after a refill reloads with its refill period markers: a call later
in the same period refills nothing, the first call of the next period refills once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest

from redcredit import PlanSettings, RedCredit, RefillSettings, Settings
from redcredit.ledger.evict import evict_idle
from redcredit.ledger.reconcile import reconcile
from redcredit.ledger.syncer import Syncer

DAY_MS = 86_400_000


# Where the clock starts, from the start of today (UTC): a rolling period
# before the refill, or in the calendar day before. The client names only
# yesterday's, today's and tomorrow's starts, so every call falls in them.
@pytest.mark.parametrize(
    ("every", "started"),
    [(timedelta(days=1), -DAY_MS - 10_000), ("day", -10_000)],
    ids=["rolling", "calendar"],
)
def test_a_reloaded_account_refills_once_per_period(
    pg_settings: Settings, pg: psycopg.Connection[Any], every: timedelta | str, started: int
) -> None:
    refill = RefillSettings(credits=100, chat_messages=3, every=every, mode="add")  # type: ignore[arg-type]
    settings = pg_settings.model_copy(
        update={"plans": {**pg_settings.plans, "daily": PlanSettings(refill=refill)}}
    )
    with RedCredit(settings=settings) as rc, Syncer(settings) as syncer:
        now = rc.balance("clock").server_time_ms
        today = now - now % DAY_MS

        def at(ms: int) -> tuple[int, int]:
            rc.engine.clock_offset_ms = ms - now
            balance = rc.balance("refilled")
            return balance.credits, balance.chat_messages

        def evicted() -> None:
            assert syncer.drain().caught_up
            report = evict_idle(settings, None, pg, idle=timedelta(0))
            assert report.outcomes["evicted"] >= 1, report.outcomes

        refilled_at = today + 10_000
        rc.engine.clock_offset_ms = today + started - now
        rc.set_plan("refilled", "daily")
        start = at(today + started)  # the first touch starts the clock
        assert at(refilled_at) == (start[0] + 100, start[1] + 3)
        evicted()
        # Later in the same period (a day's rolling period; the same UTC day).
        assert at(refilled_at + 60_000) == (start[0] + 100, start[1] + 3)
        evicted()
        # The next period, sooner than a day after the call that reloaded it.
        assert at(refilled_at + DAY_MS + 30_000) == (start[0] + 200, start[1] + 6)
        assert at(refilled_at + DAY_MS + 90_000) == (start[0] + 200, start[1] + 6)

        assert syncer.drain().caught_up
        rows = pg.execute(
            f'SELECT credit_delta, chat_delta FROM "{settings.pg_schema}".ledger '
            "WHERE account = 'refilled' AND op = 'refill' ORDER BY seq"
        ).fetchall()
        assert sorted(rows) == [(0, 3), (0, 3), (100, 0), (100, 0)]
        assert reconcile(settings, None, pg).clean
