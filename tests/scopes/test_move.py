"""Moving an account to another place: between trees, into one and back out, the
refusals that change nothing, retries, a crash between the two steps, and spends
racing the move."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from redcredit import (
    AccountMoved,
    InvalidInput,
    MoveRefused,
    NotInScope,
    RedCredit,
    RedCreditError,
    Scope,
    ScopeRequired,
)

from .conftest import entries, tree

ALICE = Scope("acme", "research", "alice")
OPS = Scope("globex", "ops")


def _snapshot(rc: RedCredit) -> dict[bytes, Any]:
    """Every key of the deployment, dumped: a refusal must leave them all as they were."""
    prefix = rc.settings.key_prefix
    found = {}
    for node in _nodes(rc):
        for key in node.scan_iter(match=f"{prefix}:*", count=1000):
            found[key] = node.dump(key)
    return found


def _nodes(rc: RedCredit) -> list[Any]:
    redis = rc.redis
    if hasattr(redis, "get_primaries"):
        return [redis.get_redis_connection(node) for node in redis.get_primaries()]
    return [redis]


def _unchanged(rc: RedCredit, call: Callable[[], object], reason: str) -> None:
    before = _snapshot(rc)
    with pytest.raises(MoveRefused) as refused:
        call()
    assert refused.value.reason == reason, refused.value
    assert _snapshot(rc) == before


def test_a_leaf_moves_between_trees_with_what_it_holds(rc: RedCredit) -> None:
    tree(rc, ("acme", "research"), ALICE.path, OPS.path)
    rc.grant(ALICE, 70, chat_messages=3)
    rc.grant(ALICE, 30, grant_id="welcome", category="promotional")
    rc.spend(ALICE, cost=5, idempotency_key="s-1")
    before = rc.balance(ALICE)

    moved = rc.move("alice", OPS, idempotency_key="move-1")
    assert (moved.path, moved.previous, moved.moved) == (
        ("globex", "ops", "alice"),
        ALICE.path,
        True,
    )
    after = rc.balance(OPS.child("alice"))
    assert (after.credits, after.chat_messages, after.plan) == (95, 3, before.plan)
    assert [(b.id, b.remaining) for b in after.buckets] == [
        (b.id, b.remaining) for b in before.buckets
    ]
    with pytest.raises(AccountMoved) as old:
        rc.spend(ALICE, cost=1)
    assert old.value.to == ("globex", "ops")
    with pytest.raises(ScopeRequired) as alone:
        rc.balance("alice")
    assert alone.value.root == "globex"
    # The journals: no credit moves, the sequence runs on across partitions.
    out = entries(rc, "acme", "alice")[-1]
    into = entries(rc, "globex", "alice")[-1]
    assert (out["op"], out["dc"], out["pa"], out["ro"]) == ("move_out", "0", "research", "acme")
    assert (into["op"], into["dc"], into["pa"], into["ro"]) == ("move_in", "0", "ops", "globex")
    assert int(into["s"]) == int(out["s"]) + 1 == moved.sequence
    counts = [
        (e["Z"], e["v"], e["f"]) for e in entries(rc, "acme", "research") if e["op"] == "child"
    ]
    assert counts == [("1", "alice", "attach"), ("0", "alice", "move_out")]
    assert entries(rc, "globex", "ops")[-1]["Z"] == "1"

    # Retried: the same answer, nothing more.
    again = rc.move("alice", OPS, idempotency_key="move-1")
    assert (again.moved, again.replayed, again.sequence) == (True, True, moved.sequence)
    # Where it is already: nothing to do.
    assert not rc.move("alice", OPS, idempotency_key="move-2").moved
    # The old parent has no child left, so it moves too: out to a root of its own.
    rc.move("research", None, idempotency_key="move-3")
    assert rc.balance("research").credits == 0
    rc.spend(OPS.child("alice"), cost=95)


def test_an_account_alone_moves_into_a_tree_and_back_out(rc: RedCredit) -> None:
    rc.grant("bob", 40)
    rc.grant("acme", 100)
    moved = rc.move("bob", Scope("acme"), idempotency_key="in")
    assert moved.previous == ("bob",)
    member = Scope("acme", "bob")
    assert rc.balance(member).credits == 40
    with pytest.raises(ScopeRequired):
        rc.spend("bob", cost=1)
    rc.spend(member, cost=60)  # 40 of its own, 20 from acme
    assert rc.balance("acme").credits == 80

    back = rc.move(member, None, idempotency_key="out")
    assert (back.path, back.previous) == (("bob",), ("acme", "bob"))
    rc.grant("bob", 5)
    assert rc.balance("bob").credits == 5
    with pytest.raises(AccountMoved) as old:
        rc.balance(member)
    assert old.value.to is None
    # acme has no child again: it may become a member of another tree.
    rc.move("acme", Scope("bob"), idempotency_key="acme-in")
    assert rc.balance(Scope("bob", "acme")).credits == 80


def test_refusals_change_nothing(rc: RedCredit) -> None:
    tree(rc, ("acme", "research"), ALICE.path, ("acme", "research", "alice", "key-1"), OPS.path)
    tree(rc, ("deep", "a"), ("deep", "a", "b"))
    rc.grant("acme", 100)
    # A parent is refused: only a leaf moves.
    _unchanged(rc, lambda: rc.move("alice", OPS, idempotency_key="m"), "children")
    _unchanged(rc, lambda: rc.move("acme", OPS, idempotency_key="m"), "children")
    # Its own subtree, too deep: refused before any I/O.
    with pytest.raises(MoveRefused) as cycle:
        rc.move("key-1", ALICE.child("key-1"), idempotency_key="m")
    assert cycle.value.reason == "cycle"
    with pytest.raises(MoveRefused) as deep:
        rc.move("key-1", Scope("deep", "a", "b", "c"), idempotency_key="m")
    assert deep.value.reason == "depth"
    # A parent that does not exist, or an account that does not.
    key_1 = ALICE.child("key-1")
    _unchanged(rc, lambda: rc.move("key-1", Scope("nobody"), idempotency_key="m"), "target")
    _unchanged(rc, lambda: rc.move("ghost", OPS, idempotency_key="m"), "not_found")
    _unchanged(
        rc, lambda: rc.move("key-1", Scope("globex", "research"), idempotency_key="m"), "target"
    )
    before = _snapshot(rc)
    with pytest.raises(NotInScope):
        rc.move("key-1", Scope("acme", "alice"), idempotency_key="m")
    with pytest.raises(InvalidInput):
        rc.move("key-1", OPS, idempotency_key=None)  # type: ignore[arg-type]
    assert _snapshot(rc) == before
    # A live reservation: its own hold, or one its ancestors alone hold.
    rc.reserve(key_1, 10)
    _unchanged(rc, lambda: rc.move("key-1", OPS, idempotency_key="m"), "holds")
    rc.grant(key_1, 50)
    rc.reserve(key_1, 5)
    _unchanged(rc, lambda: rc.move("key-1", OPS, idempotency_key="m"), "holds")


def test_a_hold_only_an_ancestor_keeps_is_found(rc: RedCredit) -> None:
    tree(rc, ("acme", "research"), ALICE.path, OPS.path)
    rc.grant("acme", 100)
    held = rc.reserve(ALICE, 10)
    assert rc.balance("acme").held == 10 and rc.balance(ALICE).held == 0
    _unchanged(rc, lambda: rc.move("alice", OPS, idempotency_key="m"), "holds")
    rc.settle(held, actual=4)
    assert rc.move("alice", OPS, idempotency_key="m").moved


def test_a_crash_between_the_steps_is_finished_by_a_retry(rc: RedCredit) -> None:
    tree(rc, ("acme", "research"), ALICE.path, OPS.path)
    rc.grant(ALICE, 25)
    out = rc.run(rc.engine.move_out("alice", OPS, idempotency_key="mv"))
    assert out.moved
    # Neither place serves it meanwhile: no call succeeds on both sides.
    with pytest.raises(AccountMoved) as gone:
        rc.spend(ALICE, cost=1)
    assert gone.value.to == OPS.path
    with pytest.raises(RedCreditError):
        rc.spend(OPS.child("alice"), cost=1)
    # Another move of it waits for this one.
    with pytest.raises(MoveRefused) as busy:
        rc.move("alice", None, idempotency_key="other")
    assert (busy.value.reason, busy.value.move_id) == ("busy", "mv")
    done = rc.move("alice", OPS, idempotency_key="mv")
    assert (done.moved, done.replayed, done.previous) == (True, True, ALICE.path)
    assert rc.balance(OPS.child("alice")).credits == 25
    assert rc.move("alice", OPS, idempotency_key="mv").sequence == done.sequence


@pytest.mark.parametrize("side", ["old", "new"])
def test_spends_racing_a_move_succeed_on_one_side_only(rc: RedCredit, side: str) -> None:
    tree(rc, ("acme", "research"), ALICE.path, OPS.path)
    rc.grant(ALICE, 10_000)
    new = OPS.child("alice")
    paid: list[int] = []
    stop = threading.Event()

    def spender(path: Scope) -> None:
        while not stop.is_set():
            try:
                rc.spend(path, cost=1)
                paid.append(1)
            except RedCreditError:
                pass

    threads = [threading.Thread(target=spender, args=(p,)) for p in (ALICE, new, ALICE, new)]
    for thread in threads:
        thread.start()
    rc.move("alice", OPS, idempotency_key="race")
    for _ in range(50):
        if len(paid) > 10:
            break
        threading.Event().wait(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert rc.balance(new).credits == 10_000 - len(paid)
    assert rc.balance("acme").credits == 0 and rc.balance("globex").credits == 0
    ours = [e for e in entries(rc, "acme", "alice") + entries(rc, "globex", "alice")]
    assert -sum(int(e["dc"]) for e in ours if e["op"] == "spend") == len(paid)


def test_a_crash_before_the_stub_moves_on_is_finished_by_a_retry(rc: RedCredit) -> None:
    tree(rc, ("acme", "research"), ALICE.path, OPS.path)
    first = rc.move("alice", OPS, idempotency_key="mv")
    # As if the last step had not run: the stub still names the old root.
    stub = rc.engine.keys.for_account("alice").hash
    if rc.redis.hexists(stub, "c"):
        pytest.skip("alice's own partition is globex's: her hash is the stub")
    rc.redis.hset(stub, "R", "acme")
    again = rc.move("alice", OPS, idempotency_key="mv")
    assert (again.replayed, again.sequence) == (True, first.sequence)
    assert rc.redis.hget(stub, "R") == b"globex"


def test_a_hydration_racing_the_move_does_not_bring_the_account_back(rc: RedCredit) -> None:
    from redcredit import AccountSnapshot
    from redcredit.core.replies import Status

    tree(rc, ("acme", "research"), ALICE.path, OPS.path)
    rc.grant(ALICE, 10)
    rc.run(rc.engine.move_out("alice", OPS, idempotency_key="mv"))
    # A call that found the account missing before the move, loading it after.
    old = rc.engine.keys.for_account("alice", "acme")
    stale = AccountSnapshot(
        credits=10, chat_messages=0, plan="free", sequence=2, parent="research", root="acme"
    )

    def hydrate():  # type: ignore[no-untyped-def]
        return (yield rc.engine._hydrate(old, stale))

    assert rc.run(hydrate())[0] == Status.MOVED
    assert not rc.redis.hexists(old.hash, "c")
    rc.move("alice", OPS, idempotency_key="mv")
    assert rc.balance(OPS.child("alice")).credits == 10
