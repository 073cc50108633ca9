"""Reservations on a path: held at every level that may pay, released at every level."""

from __future__ import annotations

import pytest

from redcredit import Cap, CapReached, InsufficientCredits, RedCredit, Scope

from .conftest import entries, tree

ALICE = Scope("acme", "research", "alice")
BOB = Scope("acme", "research", "bob")


def _org(rc: RedCredit, credits: int = 100) -> None:
    tree(rc, ("acme", "research"), ALICE.path, BOB.path)
    rc.grant("acme", credits)


def test_a_hold_counts_at_the_level_that_backs_it(rc: RedCredit) -> None:
    _org(rc)
    held = rc.reserve(ALICE, 80)
    assert held.path == ALICE.path
    assert rc.balance("acme").available == 20
    with pytest.raises(InsufficientCredits):
        rc.reserve(BOB, 30)
    settled = rc.settle(held, actual=50)
    assert (settled.charged, settled.uncharged) == (50, 0)
    acme = rc.balance("acme")
    assert (acme.credits, acme.held, acme.available) == (50, 0, 50)


def test_a_cap_counts_live_holds(rc: RedCredit) -> None:
    _org(rc, credits=1_000)
    rc.set_cap(ALICE, Cap(credits=100))
    held = rc.reserve(ALICE, 80)
    with pytest.raises(CapReached):
        rc.spend(ALICE, cost=30)
    rc.settle(held, actual=50)
    rc.spend(ALICE, cost=50)
    with pytest.raises(CapReached):
        rc.spend(ALICE, cost=1)
    assert rc.balance("acme").credits == 900


def test_a_settle_never_charges_past_a_cap(rc: RedCredit) -> None:
    _org(rc, credits=1_000)
    rc.set_cap(ALICE, Cap(credits=100))
    held = rc.reserve(ALICE, 40)
    settled = rc.settle(held, actual=150)
    assert (settled.charged, settled.uncharged) == (100, 50)
    assert rc.balance("acme").credits == 900


def test_a_lapsed_hold_frees_every_level(rc: RedCredit) -> None:
    _org(rc)
    rc.set_cap(ALICE, Cap(credits=90))
    held = rc.reserve(ALICE, 80, ttl=30)
    rc.engine.clock_offset_ms += 31_000
    assert rc.balance("acme").available == 100
    assert any(e["op"] == "lapse" for e in entries(rc, "acme", "acme"))
    # The cap no longer counts the lapsed hold either.
    rc.spend(ALICE, cost=90)
    late = rc.settle(held, actual=10, allow_late=True)
    assert (late.outcome, late.charged, late.uncharged) == ("settled_late", 0, 10)
    assert rc.balance("acme").credits == 10


def test_a_renewal_moves_every_level_s_deadline(rc: RedCredit) -> None:
    _org(rc)
    held = rc.reserve(ALICE, 60, ttl=30)
    rc.engine.clock_offset_ms += 20_000
    renewed = rc.extend(held, ttl=60)
    assert renewed.deadline_ms > held.deadline_ms
    rc.engine.clock_offset_ms += 20_000
    # Past the first deadline, the hold still counts at the root.
    assert rc.balance("acme").available == 40
    rc.release(renewed)
    assert rc.balance("acme").available == 100


def test_released_at_every_level(rc: RedCredit) -> None:
    _org(rc)
    rc.grant(ALICE, 30)
    held = rc.reserve(ALICE, 50)
    assert (rc.balance(ALICE).available, rc.balance("acme").available) == (0, 80)
    rc.release(held)
    assert (rc.balance(ALICE).available, rc.balance("acme").available) == (30, 100)
    assert [e["op"] for e in entries(rc, "acme", "acme")][-1] == "release"
