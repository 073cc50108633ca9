"""Credit buckets: grants that burn in order, expire at their instant, and back live holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from redcredit import (
    GrantExists,
    GrantExpired,
    GrantNotFound,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidInput,
    RedCredit,
    Settings,
    TooManyGrants,
)
from redcredit.config import GrantSettings

from .conftest import buckets, journal, make_settings, server_ms


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def test_plain_grants_join_the_base_bucket(grc: RedCredit) -> None:
    grc.grant("plain", 40)
    balance = grc.balance("plain")
    assert [(b.id, b.remaining, b.category, b.expires_at_ms) for b in balance.buckets] == [
        ("base", 40, "paid", None)
    ]
    # No bucket of its own: the plain path, and no 'bk' in the journal.
    assert all("bk" not in entry for entry in journal(grc, "plain"))


def test_the_balance_is_the_sum_of_the_live_buckets(grc: RedCredit) -> None:
    grc.grant("sum", 10)
    made = grc.grant("sum", 25, category="promotional", expires_in=3600)
    assert made.grant_id is not None and made.expires_at_ms is not None
    grc.grant("sum", 5, grant_id="purchase-1")
    balance = grc.balance("sum")
    assert balance.credits == 40
    assert {b.id: b.remaining for b in balance.buckets} == {
        "base": 10,
        made.grant_id: 25,
        "purchase-1": 5,
    }


def test_default_burn_order_priority_then_expiry_then_category(grc: RedCredit) -> None:
    now = server_ms(grc, "order")
    grc.grant("order", 10)  # base: paid, never expires
    grc.grant("order", 10, grant_id="paid-late", category="paid", expires_at=_at(now + 9_000_000))
    grc.grant("order", 10, grant_id="promo-soon", category="promotional", expires_in=3_600)
    grc.grant("order", 10, grant_id="promo-never", category="promotional")
    grc.grant("order", 10, grant_id="free-never", category="free")
    grc.grant("order", 10, grant_id="urgent", priority=1)
    ids = [b.id for b in grc.balance("order").buckets]
    assert ids == ["urgent", "promo-soon", "paid-late", "free-never", "promo-never", "base"]
    grc.spend("order", cost=25)
    assert buckets(grc, "order") == {
        "paid-late": (5, 0),
        "free-never": (10, 0),
        "promo-never": (10, 0),
        "base": (10, 0),
    }
    spend = journal(grc, "order")[-1]
    assert spend["op"] == "spend" and spend["dc"] == "-25"
    assert spend["bk"] == "urgent:-10:0,promo-soon:-10:0,paid-late:-5:5"


def test_the_burn_order_is_configurable(redis_url: str, prefix: str) -> None:
    settings = make_settings(
        redis_url, prefix, grants=GrantSettings(burn_order=("category", "created"))
    )
    with RedCredit(settings=settings) as client:
        client.grant("cfg", 10, grant_id="paid-1", category="paid")
        client.grant("cfg", 10, grant_id="promo-1", category="promotional", expires_in=60)
        client.spend("cfg", cost=12)
        # Category first: promotional before paid, whatever the expiry.
        assert buckets(client, "cfg") == {"paid-1": (8, 0), "base": (0, 0)}


def test_expiry_is_exact_and_journals_what_is_lost(grc: RedCredit) -> None:
    grc.grant("exp", 7)
    expires = server_ms(grc, "exp") + 60_000
    grc.grant("exp", 50, grant_id="trial", category="promotional", expires_at=_at(expires))
    grc.spend("exp", cost=20)
    grc.engine.clock_offset_ms = expires - server_ms(grc, "exp") - 200
    assert grc.balance("exp").credits == 37
    grc.engine.clock_offset_ms = expires - server_ms(grc, "exp")
    balance = grc.balance("exp")
    assert balance.credits == 7
    assert [b.id for b in balance.buckets] == ["base"]
    expired = journal(grc, "exp")[-1]
    assert (expired["op"], expired["dc"], expired["g"], expired["bk"]) == (
        "expire",
        "-30",
        "trial",
        "trial:-30:0",
    )


def test_a_pending_grant_joins_the_balance_at_its_start(grc: RedCredit) -> None:
    start = server_ms(grc, "later") + 60_000
    made = grc.grant("later", 30, grant_id="next-month", effective_at=_at(start))
    assert made.credits == 0 and made.effective_at_ms == start
    pending = grc.balance("later").buckets
    assert [(b.id, b.live) for b in pending] == [("base", True), ("next-month", False)]
    with pytest.raises(InsufficientCredits):
        grc.spend("later", cost=1)
    grc.engine.clock_offset_ms = start - server_ms(grc, "later")
    assert grc.spend("later", cost=1).credits_remaining == 29
    ops = [(e["op"], e["dc"]) for e in journal(grc, "later")]
    assert ops[-2:] == [("effective", "30"), ("spend", "-1")]


def test_a_hold_counts_only_credits_that_outlive_its_deadline(grc: RedCredit) -> None:
    expires = server_ms(grc, "hold") + 30_000
    grc.grant("hold", 100, grant_id="promo", category="promotional", expires_at=_at(expires))
    # A lease ending after the bucket expires is not backed by it.
    with pytest.raises(InsufficientCredits) as refused:
        grc.reserve("hold", 10, ttl=60)
    assert refused.value.available == 0
    assert buckets(grc, "hold") == {"promo": (100, 0), "base": (0, 0)}
    held = grc.reserve("hold", 60, ttl=20)
    assert buckets(grc, "hold") == {"promo": (100, 60), "base": (0, 0)}
    assert grc.balance("hold").available == 40
    # Renewing past the expiry needs credits that last: refused, nothing changes.
    with pytest.raises(InsufficientCredits):
        grc.extend(held, ttl=60)
    assert buckets(grc, "hold") == {"promo": (100, 60), "base": (0, 0)}
    grc.grant("hold", 70)
    renewed = grc.extend(held, ttl=60)
    assert renewed.deadline_ms > expires
    assert buckets(grc, "hold") == {"promo": (100, 0), "base": (70, 60)}
    # At the expiry the promotional credits go; the hold stays backed.
    grc.engine.clock_offset_ms = expires - server_ms(grc, "hold")
    balance = grc.balance("hold")
    assert (balance.credits, balance.held, balance.available) == (70, 60, 10)
    settled = grc.settle(held, 45)
    assert (settled.charged, settled.credits_remaining) == (45, 25)


def test_a_hold_on_a_bucket_at_its_expiry_instant(grc: RedCredit) -> None:
    """A deadline at the bucket's expiry is backed: the hold lapses as the credits go."""
    grc.grant("edge", 10, grant_id="b", category="promotional", expires_in=20)
    expires = next(b.expires_at_ms for b in grc.balance("edge").buckets if b.id == "b")
    assert expires is not None
    held = grc.reserve("edge", 10, ttl=5)
    deadline = held.deadline_ms
    assert deadline <= expires
    grc.engine.clock_offset_ms = expires - server_ms(grc, "edge")
    balance = grc.balance("edge")
    assert (balance.credits, balance.held, balance.available) == (0, 0, 0)
    ops = [e["op"] for e in journal(grc, "edge")]
    assert ops[-2:] == ["lapse", "expire"]


def test_settle_burns_in_order_after_freeing_the_hold(grc: RedCredit) -> None:
    grc.grant("settle", 20)
    grc.grant("settle", 20, grant_id="promo", category="promotional")
    held = grc.reserve("settle", 30)
    assert buckets(grc, "settle") == {"promo": (20, 20), "base": (20, 10)}
    settled = grc.settle(held, 25)
    assert settled.charged == 25
    assert buckets(grc, "settle") == {"base": (15, 0)}
    assert journal(grc, "settle")[-1]["bk"] == "promo:-20:0,base:-5:15"


def test_void_takes_back_what_is_left(grc: RedCredit) -> None:
    grc.grant("void", 100, grant_id="bought", reason="order 1")
    grc.spend("void", cost=30)
    voided = grc.void("void", "bought", reason="refunded")
    assert (voided.voided, voided.credits, voided.moved) == (70, 0, 0)
    entry = journal(grc, "void")[-1]
    assert (entry["op"], entry["dc"], entry["g"], entry["f"]) == (
        "void",
        "-70",
        "bought",
        "refunded",
    )
    with pytest.raises(GrantNotFound):
        grc.void("void", "bought")


def test_void_moves_the_holds_it_backs_or_refuses(grc: RedCredit) -> None:
    grc.grant("vh", 50, grant_id="promo", category="promotional")
    held = grc.reserve("vh", 40)
    with pytest.raises(InsufficientCredits):
        grc.void("vh", "promo")
    assert buckets(grc, "vh") == {"promo": (50, 40), "base": (0, 0)}
    grc.grant("vh", 45)
    voided = grc.void("vh", "promo")
    assert (voided.voided, voided.moved) == (50, 40)
    assert buckets(grc, "vh") == {"base": (45, 40)}
    assert grc.settle(held, 40).credits_remaining == 5


def test_void_of_a_pending_grant(grc: RedCredit) -> None:
    start = server_ms(grc, "vp") + 3_600_000
    grc.grant("vp", 10, grant_id="future", effective_at=_at(start))
    voided = grc.void("vp", "future")
    assert (voided.voided, voided.credits) == (10, 0)
    assert journal(grc, "vp")[-1]["dc"] == "0"


def test_grants_are_bounded_never_merged(redis_url: str, prefix: str) -> None:
    settings = make_settings(redis_url, prefix, grants=GrantSettings(max_grants=3))
    with RedCredit(settings=settings) as client:
        for i in range(3):
            client.grant("many", 1, grant_id=f"g{i}")
        before = client.balance("many")
        with pytest.raises(TooManyGrants) as refused:
            client.grant("many", 1, grant_id="g3")
        assert refused.value.most == 3
        assert client.balance("many").buckets == before.buckets
        # Plain grants still go to the base bucket.
        assert client.grant("many", 5).credits == 8


def test_a_keyed_grant_is_applied_once(grc: RedCredit) -> None:
    first = grc.grant("idem", 10, category="promotional", idempotency_key="pay-1")
    again = grc.grant("idem", 10, category="promotional", idempotency_key="pay-1")
    assert again.replayed and again.grant_id == first.grant_id
    assert grc.balance("idem").credits == 10
    with pytest.raises(IdempotencyConflict):
        grc.grant("idem", 11, category="promotional", idempotency_key="pay-1")


def test_refusals_from_redis_change_nothing(grc: RedCredit) -> None:
    grc.grant("ref", 5, grant_id="one")
    before = grc.balance("ref")
    entries = len(journal(grc, "ref"))
    with pytest.raises(GrantExists):
        grc.grant("ref", 5, grant_id="one")
    past = server_ms(grc, "ref") - 1_000
    with pytest.raises(GrantExpired):
        grc.grant("ref", 5, expires_at=_at(past))
    assert grc.balance("ref").buckets == before.buckets
    assert len(journal(grc, "ref")) == entries


@pytest.mark.parametrize(
    "arguments",
    [
        {"category": "gold"},
        {"category": "Paid"},
        {"grant_id": "base"},
        {"grant_id": "refill"},
        {"grant_id": "a,b"},
        {"priority": -1},
        {"priority": 1001},
        {"priority": True},
        {"expires_at": datetime(2030, 1, 1)},
        {"effective_at": "2030-01-01"},
        {"expires_in": 0},
        {"expires_in": 3600, "expires_at": datetime(2030, 1, 1, tzinfo=UTC)},
        {
            "effective_at": datetime(2030, 1, 2, tzinfo=UTC),
            "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
        },
    ],
)
def test_bad_grants_are_refused_before_any_io(
    arguments: dict[str, object], grant_settings: Settings
) -> None:
    with (
        RedCredit("redis://127.0.0.1:1", settings=grant_settings) as client,
        pytest.raises(InvalidInput),
    ):
        client.grant("bad", 10, **arguments)  # type: ignore[arg-type]


def test_a_bucket_grant_adds_credits(grc: RedCredit) -> None:
    with pytest.raises(InvalidInput):
        grc.grant("zero", 0, chat_messages=3, category="promotional")
    with pytest.raises(InvalidInput):
        grc.void("zero", "base")


def test_negative_corrections_burn_in_order(grc: RedCredit) -> None:
    grc.grant("corr", 10)
    grc.grant("corr", 10, grant_id="promo", category="promotional")
    grc.correct("corr", -15, reason="chargeback")
    assert buckets(grc, "corr") == {"base": (5, 0)}


def test_expires_in_accepts_a_timedelta(grc: RedCredit) -> None:
    made = grc.grant("td", 3, expires_in=timedelta(minutes=5))
    assert made.expires_at_ms is not None
    assert 299_000 <= made.expires_at_ms - server_ms(grc, "td") <= 300_000
