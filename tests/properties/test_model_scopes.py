"""Random sequences of calls on a small tree against the scope model, on one server and on a
three-primary cluster.

The tree is a root, two teams and two users under each. Steps spend, take chat
turns, reserve, settle, release and renew, grant, set and remove caps (with
windows of a fixed length), put a team on a bypassing plan and the root on
an overdraft and back, retry keyed calls, and move time. The model
(``scope_model.py``) restates docs/scopes.md; after every step each level's
balances are read back and compared, and so are its cap's use and holds (from
its hash) and its journal, which sums to its credits. A refusal must be the
model's: the same error, naming the same level (and resource, ceiling, use,
what was required and available).

Time moves with the test-only ``engine.clock_offset_ms``, in whole steps of
2**18 ms. The server's clock is set to a whole multiple of every cap window
when the run begins, so it runs ahead of the model's instants by the run's
real duration alone (far less than a step): a window turns, and a lease
ends, at exactly the model's step.

``REDCREDIT_SCOPE_EXAMPLES`` sets the examples per topology (the long mode:
e.g. 500).
"""

from __future__ import annotations

import collections
import functools
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from redcredit import (
    Cap,
    IdempotencyConflict,
    NotInScope,
    PlanSettings,
    RedCredit,
    ReservationRef,
    Scope,
    ScopeRequired,
    Settings,
    Settlement,
)

from .scope_model import CapRule, Plan, Refused, Tree

STEP = 2**18
EXAMPLES = int(os.environ.get("REDCREDIT_SCOPE_EXAMPLES", "60"))
WINDOWS = (2 * STEP, 4 * STEP)
ALIGN = 4 * STEP  # every window divides it
PATHS = [("r",), ("r", "ta"), ("r", "tb"), ("r", "ta", "ua1"), ("r", "ta", "ua2")]
PATHS += [("r", "tb", "ub1"), ("r", "tb", "ub2")]
SCOPES = {path[-1]: Scope(*path) for path in PATHS}
PLANS = {"free": Plan(), "paid": Plan(bypass=True), "postpaid": Plan(overdraft=60)}
SEEN: collections.Counter[str] = collections.Counter()

USERS = ["ua1", "ua2", "ub1", "ub2"]
# Mostly users; a team or the root itself now and then.
CALLERS = st.sampled_from([*USERS, *USERS, "ta", "tb", "r"])
LEVELS = st.sampled_from(sorted(SCOPES))
KEYS = st.sampled_from([None, None, "new", "k1"])
CAPS = st.one_of(
    st.none(),
    st.builds(
        CapRule,
        credits=st.one_of(st.none(), st.integers(0, 90)),
        messages=st.one_of(st.none(), st.integers(0, 4)),
        window=st.sampled_from(WINDOWS),
    ).filter(lambda c: c.credits is not None or c.messages is not None),
)


@dataclass
class Made:
    account: str
    id: str
    path: tuple[str, ...]
    closed: Settlement | None = None

    @property
    def ref(self) -> ReservationRef:
        return ReservationRef(self.account, self.id, self.path)


def keyed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Gives key "new" a name never used before, and remembers a keyed call for a retry."""

    @functools.wraps(method)
    def wrapper(self: ScopeMachine, **arguments: Any) -> Any:
        if arguments["key"] == "new":
            self.keys_made += 1
            arguments = {**arguments, "key": f"new{self.keys_made}"}
        if arguments["key"] is not None:
            self.last_keyed = (method, arguments)
        return method(self, **arguments)

    return wrapper


class ScopeMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self, client: RedCredit, raw: Any) -> None:
        super().__init__()
        self.client = client
        self.raw = raw
        self.tree = Tree(PLANS)
        for path in PATHS:
            self.tree.add(*path)
            if len(path) > 1:
                client.attach(Scope(*path))
        # (account, key) -> (the call, its first answer)
        self.keys: dict[tuple[str, str], tuple[tuple[object, ...], Any]] = {}
        self.last_keyed: tuple[Callable[..., Any], dict[str, Any]] | None = None
        self.keys_made = 0
        self.made: list[Made] = []
        seconds, micros = raw.time()
        origin = int(seconds) * 1000 + int(micros) // 1000
        # The server's model time zero: a whole multiple of every window.
        self.shift = -origin % ALIGN
        self.zero = origin + self.shift
        self.set_clock()

    def teardown(self) -> None:
        self.client.close()

    def set_clock(self) -> None:
        self.client.engine.clock_offset_ms = self.shift + self.tree.now

    def lag(self, server_ms: int, model_ms: int) -> int:
        """How far the server's instant is past the model's: the run's duration so far."""
        lag = server_ms - self.zero - model_ms
        assert 0 <= lag < STEP // 4, ("too slow for the steps, or off by a step", lag)
        return lag

    # -- calls against the model -----------------------------------------------------------------

    def attempt(self, label: str, change: Callable[[Tree], Any], call: Callable[[], Any]) -> Any:
        """Runs ``change`` on a copy of the tree: a refusal must be the server's too.

        Returns (the server's answer, the changed copy, what ``change`` returned), or
        None once the refusal is checked.
        """
        trial = self.tree.trial()
        try:
            outcome = change(trial)
        except Refused as refused:
            expected = refused
        else:
            SEEN[label] += 1
            return call(), trial, outcome
        where = expected.details.get("level", "")
        SEEN[f"{label} refused: {expected.error} {where}"] += 1
        with pytest.raises(Exception) as raised:
            call()
        error: Any = raised.value
        assert type(error).__name__ == expected.error, error
        for name, value in expected.details.items():
            if name == "wait":
                # The window turns at the model's instant; the server is a lag past it.
                assert 0 <= value - error.retry_after_ms < STEP // 4, (value, error)
            else:
                assert getattr(error, name) == value, (name, value, error)
        return None

    def replayed(
        self, account: str, key: str | None, call_id: tuple[object, ...], call: Callable[[], Any]
    ) -> bool:
        """True when ``key`` was used before on the account: the same call returns the first
        answer, any other is refused, and neither changes anything."""
        if key is None or (account, key) not in self.keys:
            return False
        first_id, first = self.keys[(account, key)]
        if first_id != call_id:
            SEEN["key reused: conflict"] += 1
            with pytest.raises(IdempotencyConflict):
                call()
        else:
            SEEN["key reused: replay"] += 1
            assert call() == replace(first, replayed=True)
        return True

    def journal_end(self) -> bytes:
        """The id of the root partition's last journal entry (the tree's whole journal)."""
        last = self.raw.xrevrange(self.client.engine.keys.for_account("r").journal, count=1)
        return bytes(last[0][0]) if last else b"0-0"

    def check_entries(self, after: bytes, op: str, account: str, key: str | None) -> None:
        """The entries a charge journaled: one per level the model says, each with its
        depth and deltas; the call's account's carries the key, the others name it."""
        journal = self.client.engine.keys.for_account("r").journal
        made = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in self.raw.xrange(journal, min=b"(" + after)
        ]
        made = [e for e in made if e["op"] == op]
        single = len(self.tree.levels[account].path) == 1
        got = [(e["a"], 1 if single else int(e["lv"]), int(e["dc"]), int(e["dm"])) for e in made]
        assert got == self.tree.entries, (op, account)
        SEEN[f"{op} journaled by {len(got)} levels"] += 1
        for e in made:
            mine = e["a"] == account
            assert e.get("k") == (key if mine else None), e
            assert e.get("v") == (None if mine else account), e

    def remember(
        self, account: str, key: str | None, call_id: tuple[object, ...], got: Any
    ) -> None:
        if key is not None:
            self.keys[(account, key)] = (call_id, got)

    # -- the comparison after each step ----------------------------------------------------------

    def compare(self) -> None:
        balances = {name: self.client.balance(scope) for name, scope in SCOPES.items()}
        # One round trip for the rest: every key of the tree is in the root's slot.
        pipe = self.raw.pipeline(transaction=False)
        for name in SCOPES:
            keys = self.client.engine.keys.for_account(name, "r")
            pipe.hmget(keys.hash, "K", "Kw", "Kc", "Km", "Kh")
            pipe.zrange(keys.holds, 0, -1)
        pipe.xrange(self.client.engine.keys.for_account("r").journal)
        *read, journal = pipe.execute()
        entries: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
        for _, fields in journal:
            entry = {k.decode(): v.decode() for k, v in fields.items()}
            entries[entry["a"]].append(entry)
        for i, (name, balance) in enumerate(balances.items()):
            level = self.tree.levels[name]
            self.lag(balance.server_time_ms, self.tree.now)
            assert (balance.credits, balance.chat_messages, balance.held, balance.plan) == (
                level.credits,
                level.chat,
                self.tree.held(name),
                level.plan,
            ), name
            self.check_cap(name, read[2 * i], {rid.decode() for rid in read[2 * i + 1]})
            # Conservation: the account's entries in the root's partition sum to its balances.
            mine = entries[name]
            assert [int(e["s"]) for e in mine] == list(range(1, balance.sequence + 1)), name
            assert sum(int(e["dc"]) for e in mine) == balance.credits, name
            assert sum(int(e["dm"]) for e in mine) == balance.chat_messages, name

    def check_cap(self, name: str, fields: list[bytes | None], listed: set[str]) -> None:
        level = self.tree.levels[name]
        k, kw, kc, km, kh = fields
        if level.cap is None:
            assert k is None, name
            return
        cap = level.cap
        assert Cap.from_text(k.decode()) == Cap(  # type: ignore[union-attr]
            cap.credits, cap.messages, timedelta(milliseconds=cap.window)
        )
        start = self.tree.window(cap)[0]
        use = (int(kc), int(km)) if kw is not None and int(kw) == self.zero + start else (0, 0)  # type: ignore[arg-type]
        assert use == self.tree.use(level), name
        # Read after balance(): the level's lapsed holds are gone from it.
        assert int(kh or 0) == self.tree.cap_held(name), name
        # Its holds: every live one it backs or counts.
        assert listed == {
            rid
            for rid, h in self.tree.holds.items()
            if self.tree.live(h) and (h.parts.get(name) or name in h.counted)
        }, name

    # -- rules -----------------------------------------------------------------------------------

    @initialize(
        pool=st.integers(50, 300),
        chat=st.integers(0, 6),
        own=st.dictionaries(st.sampled_from(USERS), st.integers(1, 40), max_size=2),
        caps=st.dictionaries(st.sampled_from(sorted(SCOPES)), CAPS, max_size=3),
    )
    def open_tree(
        self, pool: int, chat: int, own: dict[str, int], caps: dict[str, CapRule | None]
    ) -> None:
        """The root's pool, a user's own credits, a few caps: most runs start able to pay."""
        if pool or chat:
            self.grant(account="r", credits=pool, messages=chat)
        for account, credits in own.items():
            self.grant(account=account, credits=credits, messages=0)
        for account, cap in caps.items():
            if cap is not None:
                self.set_cap(account=account, cap=cap)

    @rule(
        account=CALLERS, cost=st.integers(0, 45), messages=st.sampled_from([0, 0, 1, 2]), key=KEYS
    )
    @keyed
    def spend(self, account: str, cost: int, messages: int, key: str | None) -> None:
        """A spend (no messages) or a chat turn (messages with the credits)."""
        scope = SCOPES[account]
        if messages:
            label, call = (
                "chat_turn",
                partial(
                    self.client.chat_turn, scope, cost=cost, messages=messages, idempotency_key=key
                ),
            )
        else:
            label, call = "spend", partial(self.client.spend, scope, cost=cost, idempotency_key=key)
        call_id = (label, cost, messages)
        if not self.replayed(account, key, call_id, call):
            end = self.journal_end()
            done = self.attempt(label, lambda t: t.spend(account, cost, messages), call)
            if done is not None:
                result, trial, (credits, chat) = done
                self.tree = trial
                self.check_entries(end, "turn" if messages else "spend", account, key)
                assert (result.credits_remaining, result.replayed) == (credits, False)
                if messages:
                    assert result.chat_messages_remaining == chat
                self.remember(account, key, call_id, result)
        self.compare()

    @rule(
        target=reservations,
        account=CALLERS,
        amount=st.integers(1, 45),
        lease=st.integers(1, 4),
        messages=st.sampled_from([0, 0, 0, 1]),
        key=KEYS,
    )
    @keyed
    def reserve(self, account: str, amount: int, lease: int, messages: int, key: str | None) -> Any:
        scope = SCOPES[account]
        ttl = lease * STEP
        call = partial(
            self.client.reserve,
            scope,
            amount,
            ttl=timedelta(milliseconds=ttl),
            messages=messages,
            idempotency_key=key,
        )
        call_id = ("reserve", amount, lease, messages)
        if self.replayed(account, key, call_id, call):
            self.compare()
            return multiple()
        done = self.attempt(
            "reserve", lambda t: t.reserve(account, "new", amount, ttl, messages), call
        )
        if done is None:
            self.compare()
            return multiple()
        result, trial, hold = done
        # The root alone is no path: its reservation names none.
        path = scope.path if scope.depth > 1 else ()
        assert (result.amount, result.path, result.replayed) == (amount, path, False)
        self.lag(result.deadline_ms, hold.deadline)
        hold.rid = result.id
        trial.holds[result.id] = trial.holds.pop("new")
        self.tree = trial
        self.remember(account, key, call_id, result)
        self.compare()
        made = Made(account, result.id, path)
        self.made.append(made)
        return made

    @rule(
        made=reservations,
        how=st.sampled_from(["release", "settle", "settle", "settle_late"]),
        offset=st.one_of(st.just(0), st.integers(-50, 40)),
        key=KEYS,
    )
    @keyed
    def close(self, made: Made, how: str, offset: int, key: str | None) -> None:
        """Settles for less, as much as or more than held (or late), or releases."""
        hold = self.tree.holds[made.id]
        actual = max(hold.amount + offset, 0)
        release, late = how == "release", how == "settle_late"
        if release:
            call_id: tuple[object, ...] = ("release", made.id)
            call = partial(self.client.release, made.ref, idempotency_key=key)
        else:
            call_id = ("settle", made.id, actual, late)
            call = partial(
                self.client.settle, made.ref, actual, allow_late=late, idempotency_key=key
            )
        if self.replayed(made.account, key, call_id, call):
            return self.compare()
        if made.closed is not None:
            SEEN["closed again"] += 1
            assert call() == replace(made.closed, replayed=True)
            self.remember(made.account, key, call_id, replace(made.closed, replayed=True))
            return self.compare()
        label = how if self.tree.now < hold.deadline else f"{how} lapsed"
        end = self.journal_end()
        done = self.attempt(
            label, lambda t: t.close(made.id, None if release else actual, late), call
        )
        if done is not None:
            result, trial, (outcome, charged, left) = done
            assert result == Settlement(
                account=made.account,
                reservation_id=made.id,
                outcome=outcome,
                charged=charged,
                uncharged=(0 if release else actual) - charged,
                credits_remaining=left,
                sequence=result.sequence,
            )
            made.closed = result
            self.tree = trial
            self.check_entries(end, "release" if release else "settle", made.account, key)
            self.remember(made.account, key, call_id, result)
        self.compare()

    def open_holds(self) -> list[Made]:
        return [m for m in self.made if m.closed is None]

    @precondition(lambda self: self.open_holds())
    @rule(
        pick=st.integers(0, 3),
        how=st.sampled_from(["release", "settle", "settle_late"]),
        offset=st.integers(-20, 20),
        key=KEYS,
    )
    def close_open(self, pick: int, how: str, offset: int, key: str | None) -> None:
        """Closes a reservation still open (most drawn from the bundle are closed already)."""
        holds = self.open_holds()
        SEEN["close an open one"] += 1
        self.close(made=holds[pick % len(holds)], how=how, offset=offset, key=key)

    def counting_levels(self) -> list[str]:
        """Levels whose cap counts a live hold."""
        live = [h for h in self.tree.holds.values() if self.tree.live(h)]
        return sorted({name for h in live for name in h.counted})

    @precondition(lambda self: self.counting_levels())
    @rule(pick=st.integers(0, 3), cap=CAPS)
    def recap_counting_level(self, pick: int, cap: CapRule | None) -> None:
        """Changes or removes the cap of a level that counts a live hold."""
        levels = self.counting_levels()
        SEEN["recap a counting level"] += 1
        self.set_cap(account=levels[pick % len(levels)], cap=cap)

    @rule(made=reservations, lease=st.integers(1, 4))
    def extend(self, made: Made, lease: int) -> None:
        ttl = lease * STEP
        call = partial(self.client.extend, made.ref, ttl=timedelta(milliseconds=ttl))
        done = self.attempt("extend", lambda t: t.extend(made.id, ttl), call)
        if done is not None:
            result, trial, _ = done
            assert (result.id, result.amount, result.path) == (
                made.id,
                trial.holds[made.id].amount,
                made.path,
            )
            self.lag(result.deadline_ms, trial.holds[made.id].deadline)
            self.tree = trial
        self.compare()

    @rule(account=LEVELS, credits=st.integers(0, 60), messages=st.integers(0, 3))
    def grant(self, account: str, credits: int, messages: int) -> None:
        if credits == messages == 0:
            credits = 1
        result = self.client.grant(SCOPES[account], credits, chat_messages=messages)
        self.tree.grant(account, credits, messages)
        level = self.tree.levels[account]
        assert (result.credits, result.chat_messages) == (level.credits, level.chat)
        SEEN["grant"] += 1
        self.compare()

    @rule(account=LEVELS, cap=CAPS)
    def set_cap(self, account: str, cap: CapRule | None) -> None:
        made = None
        if cap is not None:
            made = Cap(cap.credits, cap.messages, timedelta(milliseconds=cap.window))
        result = self.client.set_cap(SCOPES[account], made)
        assert result.cap == made
        self.tree.set_cap(account, cap)
        SEEN["cap set" if cap else "cap removed"] += 1
        self.compare()

    @rule(which=st.sampled_from([("ta", "paid"), ("ta", "free"), ("r", "postpaid"), ("r", "free")]))
    def set_plan(self, which: tuple[str, str]) -> None:
        account, plan = which
        result = self.client.set_plan(SCOPES[account], plan)
        assert (result.plan, result.previous_plan) == (plan, self.tree.levels[account].plan)
        self.tree.levels[account].plan = plan
        SEEN[f"plan {plan}"] += 1
        self.compare()

    @rule(
        user=st.sampled_from(USERS),
        how=st.sampled_from(["other team", "under the root", "alone"]),
        reserve=st.booleans(),
    )
    def off_the_tree(self, user: str, how: str, reserve: bool) -> None:
        """A call naming a user by a path that is not the tree's, or by no path: refused."""
        team = self.tree.levels[user].path[1]
        if how == "alone":
            target: str | Scope = user
        elif how == "under the root":
            target = Scope("r", user)
        else:
            target = Scope("r", "tb" if team == "ta" else "ta", user)
        if reserve:
            call = partial(self.client.reserve, target, 1)
        else:
            call = partial(self.client.spend, target, cost=1)
        with pytest.raises(ScopeRequired if how == "alone" else NotInScope) as raised:
            call()
        error: Any = raised.value
        if how == "alone":
            assert error.root == "r"
        else:
            assert (error.level, error.parent) == (user, team)
        SEEN[f"off the tree: {how}"] += 1
        self.compare()

    @precondition(lambda self: self.last_keyed is not None)
    @rule()
    def repeat_keyed_call(self) -> None:
        """Retries the last call made with an idempotency key, as a client would after a timeout."""
        assert self.last_keyed is not None
        method, arguments = self.last_keyed
        method(self, **arguments)

    @rule(steps=st.integers(1, 3))
    def advance_time(self, steps: int) -> None:
        """No read follows at once: the next call, whatever it is, applies what time did."""
        self.tree.now += steps * STEP
        self.set_clock()

    @rule()
    def advance_to_next_instant(self) -> None:
        """To the next deadline or window turn, exactly."""
        due = self.tree.next_instants()
        self.tree.now = due[0] if due else self.tree.now + STEP
        self.set_clock()
        self.compare()


WHERE = ["redis_url", "three_primary_cluster_url"]


@pytest.fixture(params=WHERE, ids=["one-node", "cluster"])
def topology_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def reader(topology_url: str) -> Iterator[Any]:
    """A client of the same servers for reading keys directly (hashes, streams, TIME)."""
    with RedCredit(settings=Settings(redis_url=topology_url, key_prefix="reader")) as client:
        yield client.redis


# Shrinking a failure to its shortest case takes longer than a passing run, on a loaded
# machine past the suite's 300 s: cut short, it reports a flaky strategy instead of the case.
@pytest.mark.timeout(1200)
def test_scopes_agree_with_model(topology_url: str, reader: Any) -> None:
    def machine() -> ScopeMachine:
        settings = Settings(
            redis_url=topology_url,
            # Each run of the machine gets a fresh tree under a new prefix.
            key_prefix="ms" + uuid.uuid4().hex[:12],
            free_credits=0,
            free_chat_messages=0,
            plans={"postpaid": PlanSettings(overdraft=PLANS["postpaid"].overdraft)},
        )
        return ScopeMachine(RedCredit(settings=settings), reader)

    run_state_machine_as_test(
        machine,  # type: ignore[arg-type]
        settings=hypothesis_settings(
            max_examples=EXAMPLES,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    print("\n", ", ".join(f"{what} {n}" for what, n in sorted(SEEN.items())))
    SEEN.clear()
