"""Shortest cases of disagreements the bucket model test (tests/properties/test_model_buckets.py)
found between the server and docs/grants.md."""

from __future__ import annotations

from datetime import timedelta

from redcredit import PlanSettings, RedCredit, RefillSettings, Settings

from .conftest import make_settings

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def test_a_refill_never_gives_a_held_bucket_an_expiry_before_the_hold_ends(
    grant_settings: Settings,
) -> None:
    """A live hold is always backed (docs/grants.md): a new refill period sets the refill
    bucket's expiry from its own start, and must not set it before the deadline of a hold
    the bucket backs. Here the plan changed to one whose refills expire within the hour."""
    plans = {
        "lasting": PlanSettings(
            refill=RefillSettings(credits=80, every=timedelta(days=1), priority=40)
        ),
        "hourly": PlanSettings(
            refill=RefillSettings(
                credits=40,
                every=timedelta(days=1),
                mode="add",
                rollover="none",
                expires_in=timedelta(hours=1),
                priority=40,
            )
        ),
    }
    settings = make_settings(grant_settings.redis_url, grant_settings.key_prefix, plans=plans)
    with RedCredit(settings=settings) as client:
        client.set_plan("h", "lasting")
        client.balance("h")  # the first touch starts the refill clock
        client.engine.clock_offset_ms = DAY_MS + 1_000
        assert client.balance("h").credits == 80  # the refill bucket, never expiring
        client.engine.clock_offset_ms = DAY_MS + 1_000 + 23 * HOUR_MS
        held = client.reserve("h", 50, ttl=timedelta(hours=3))
        client.set_plan("h", "hourly")
        client.engine.clock_offset_ms = 2 * DAY_MS + 2_000
        balance = client.balance("h")  # the next period: 50 kept for the hold, 40 added
        assert balance.held == 50
        for bucket in balance.buckets:
            if bucket.held:
                assert bucket.expires_at_ms is None or bucket.expires_at_ms >= held.deadline_ms
        client.engine.clock_offset_ms = 2 * DAY_MS + 2_000 + HOUR_MS
        balance = client.balance("h")
        assert balance.held == 50  # the hold is still live: its deadline is an hour away
        assert balance.available >= 0
