"""Disagreements with docs/scopes.md that the scope model test found, each as its shortest case."""

from __future__ import annotations

from datetime import timedelta

from redcredit import Cap, RedCredit, Scope

from .conftest import tree

USER = Scope("r", "ta", "ua1")


def test_a_hold_closed_while_its_level_had_no_cap_is_not_held_against_a_new_cap(
    rc: RedCredit,
) -> None:
    """A live reservation counts against a cap until it closes, and not after.

    The hold is counted by the user's cap when it is made; the cap is removed
    and the hold settled; a cap set again afterwards must start with nothing
    held. The server keeps the closed hold's 40 in the cap's holds (field Kh)
    for good, so the new cap refuses as if 40 were still held.
    """
    tree(rc, ("r", "ta"), USER.path)
    rc.grant("r", 100)
    cap = Cap(credits=50, period=timedelta(hours=1))
    rc.set_cap(USER, cap)
    held = rc.reserve(USER, 40)
    rc.set_cap(USER, None)
    rc.settle(held, actual=10)
    rc.set_cap(USER, cap)
    # Nothing is held any more and nothing was charged under this cap: all 50 fit.
    rc.spend(USER, cost=50)
    assert rc.balance("r").credits == 40
