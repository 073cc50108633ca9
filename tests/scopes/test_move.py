"""Moving an account to another place: between trees, into one and back out, the
refusals that change nothing, retries and a crash between the two steps."""

from __future__ import annotations

import pytest

from redcredit import AccountMoved, MoveRefused, RedCredit, Scope, ScopeRequired

from .conftest import tree


def _total(rc: RedCredit, *paths: tuple[str, ...]) -> int:
    return sum(rc.balance(Scope(*p)).credits for p in paths)


def test_a_leaf_moves_between_trees_with_what_it_holds(rc: RedCredit) -> None:
    tree(rc, ("acme", "research"), ("acme", "research", "alice"), ("globex", "ops"))
    alice = Scope("acme", "research", "alice")
    rc.grant(alice, 70, idempotency_key="g-1")
    rc.grant(alice, 30, grant_id="welcome", category="promotional")
    rc.spend_chat_message(alice) if False else None
    rc.grant("acme", 500)
    before = rc.balance(alice)

    moved = rc.move("alice", Scope("globex", "ops"), idempotency_key="move-1")
    assert (moved.path, moved.previous, moved.moved) == (
        ("globex", "ops", "alice"),
        ("acme", "research", "alice"),
        True,
    )
    after = rc.balance(Scope("globex", "ops", "alice"))
    assert (after.credits, after.chat_messages, after.plan) == (
        before.credits,
        before.chat_messages,
        before.plan,
    )
    assert [(b.id, b.remaining) for b in after.buckets] == [
        (b.id, b.remaining) for b in before.buckets
    ]
    with pytest.raises(AccountMoved) as old:
        rc.spend(alice, cost=1)
    assert old.value.to == ("globex", "ops")
    with pytest.raises(ScopeRequired) as alone:
        rc.balance("alice")
    assert alone.value.root == "globex"
    # Retried: the same answer, nothing more.
    again = rc.move("alice", Scope("globex", "ops"), idempotency_key="move-1")
    assert again.moved and again.sequence == moved.sequence
    # The old parent has no child left: it may move now.
    rc.move("research", None, idempotency_key="move-2")
    assert rc.balance("research").credits == 0


def _dump(rc: RedCredit) -> None:
    from .conftest import entries

    for e in entries(rc, "globex", "alice"):
        print(e)
