"""Many spenders on one tree at once: every level exact afterwards, none ever oversold.

An organisation's pool is shared by twenty users under four teams, each user
with a cap of its own and two teams with one too; a few users have credits of
their own. 200 asyncio spenders and 8 processes (the sync client) spend, chat,
reserve and settle or release through the users' paths at once, with and
without idempotency keys, some calls sent twice. While they run, a watcher
reads every level's hash (one HMGET each, so one instant of that level): no
balance below zero, no cap past its ceiling. Afterwards what the callers were
told was charged is what left the balances, every cap's use is exactly what
went through its level, nothing is held, and the journal of the root's
partition sums to every account's credits with no gap in its sequence.

``REDCREDIT_TREE_LOAD`` multiplies the calls and the credits (the long mode:
e.g. 10).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from typing import Any

from redcredit import (
    AsyncRedCredit,
    Cap,
    CapReached,
    InsufficientChatMessages,
    InsufficientCredits,
    RedCredit,
    Scope,
    Settings,
)

from .conftest import entries

LOAD = int(os.environ.get("REDCREDIT_TREE_LOAD", "1"))
ROOT = "org"
TEAMS = [f"team{t}" for t in range(4)]
USERS = [Scope(ROOT, TEAMS[i % 4], f"user{i:02d}") for i in range(20)]
# A window of 2**40 ms (about 35 years, aligned on the epoch) never turns during the test,
# so each cap's use is the whole run's.
WINDOW = timedelta(milliseconds=2**40)
USER_CAPS = {
    u.account: Cap(120 * LOAD + 15 * (i % 7), 14 * LOAD + i % 5, WINDOW)
    for i, u in enumerate(USERS)
}
TEAM_CAPS = {
    "team0": Cap(credits=500 * LOAD, period=WINDOW),
    "team1": Cap(chat_messages=45 * LOAD, period=WINDOW),
}
CAPS = {**USER_CAPS, **TEAM_CAPS}
# The pool runs dry before the users' caps do (they sum to more), so both refusals happen.
POOL, POOL_CHAT = 2_300 * LOAD, 240 * LOAD
OWN = {u.account: 40 * LOAD for u in USERS[:5]}
ASYNC_SPENDERS, ASYNC_CALLS = 200, 10 * LOAD
PROCESSES, PROCESS_CALLS = 8, 90 * LOAD
REFUSALS = (InsufficientCredits, InsufficientChatMessages, CapReached)
# A hold its caller abandons lapses by itself a second later, at every level.
ABANDONED_TTL = 1


@dataclass(frozen=True)
class Call:
    """One caller's call: what, through which user, and whether it is sent twice."""

    kind: str  # spend, chat, turn, settle, release, abandon (a hold left to lapse)
    user: int
    cost: int
    key: str | None
    twice: bool


def plan_calls(seed: int, users: list[int], count: int) -> list[Call]:
    rng = random.Random(seed)
    calls = []
    for n in range(count):
        kind = rng.choices(
            ["spend", "chat", "turn", "settle", "release", "abandon"], [40, 10, 15, 25, 10, 5]
        )[0]
        keyed = rng.random() < 0.3
        calls.append(
            Call(
                kind=kind,
                user=rng.choice(users),
                cost=rng.randint(1, 12),
                key=f"c{seed}-{n}" if keyed else None,
                # A keyed call sent twice is a retry; a settle sent twice without a key
                # is a second close, which answers the first outcome too.
                twice=(keyed or kind == "settle") and rng.random() < 0.4,
            )
        )
    return calls


@dataclass
class Tally:
    """What the callers were told: per user, credits and messages charged; refusals seen."""

    credits: collections.Counter[str] = field(default_factory=collections.Counter)
    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    seen: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, other: Tally) -> None:
        self.credits.update(other.credits)
        self.messages.update(other.messages)
        self.seen.update(other.seen)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "credits": dict(self.credits),
            "messages": dict(self.messages),
            "seen": dict(self.seen),
        }

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, int]]) -> Tally:
        t = cls()
        t.credits.update(data["credits"])
        t.messages.update(data["messages"])
        t.seen.update(data["seen"])
        return t


def _count(tally: Tally, call: Call, results: list[Any]) -> None:
    """Counts the one first (not replayed) answer of a call sent once or twice."""
    account = USERS[call.user].account
    fresh = [r for r in results if not isinstance(r, BaseException) and not r.replayed]
    replays = [r for r in results if not isinstance(r, BaseException) and r.replayed]
    for error in (r for r in results if isinstance(r, BaseException)):
        if not isinstance(error, REFUSALS):
            raise error
        where = "user" if error.level == account else error.level
        tally.seen[f"{call.kind} refused: {type(error).__name__} at {where}"] += 1
    if call.key is not None or call.kind in ("settle", "release"):
        # A key, or one reservation closed twice: one answer at most is the first, and a
        # replay (refusals are not remembered) answers a first call that succeeded.
        assert len(fresh) <= 1, results
        assert not replays or (fresh and replays[0] == replace(fresh[0], replayed=True)), results
    tally.seen[f"{call.kind} replayed"] += len(replays)
    for result in fresh:
        tally.seen[call.kind] += 1
        if call.kind == "spend":
            tally.credits[account] += call.cost
        elif call.kind == "chat":
            tally.messages[account] += 1
        elif call.kind == "turn":
            tally.credits[account] += call.cost
            tally.messages[account] += 1
        else:
            tally.credits[account] += result.charged
            if call.kind == "settle":
                assert result.charged + result.uncharged == _actual(call)
                tally.seen["settle uncharged"] += result.uncharged > 0


def _actual(call: Call) -> int:
    # Less than, as much as, or more than the hold (cost + 4).
    return (call.cost * 7) % (call.cost + 9)


def _hold(call: Call) -> int:
    return call.cost + 4


def _closing(client: Any, held: Any, call: Call) -> Callable[[], Any]:
    if call.kind == "settle":
        return partial(client.settle, held, _actual(call), idempotency_key=call.key)
    return partial(client.release, held, idempotency_key=call.key)


def _charging(client: Any, call: Call) -> Callable[[], Any]:
    user = USERS[call.user]
    if call.kind == "spend":
        return partial(client.spend, user, cost=call.cost, idempotency_key=call.key)
    if call.kind == "chat":
        return partial(client.spend_chat_message, user, idempotency_key=call.key)
    return partial(client.chat_turn, user, cost=call.cost, idempotency_key=call.key)


def run_sync(client: RedCredit, call: Call, tally: Tally) -> None:
    if call.kind == "abandon":
        try:
            client.reserve(USERS[call.user], _hold(call), ttl=ABANDONED_TTL)
        except REFUSALS as refused:
            tally.seen[f"abandon refused: {type(refused).__name__}"] += 1
        else:
            tally.seen["abandon"] += 1
        return
    if call.kind in ("settle", "release"):
        try:
            held = client.reserve(USERS[call.user], _hold(call), ttl=60)
        except REFUSALS as refused:
            tally.seen[f"reserve refused: {type(refused).__name__}"] += 1
            return
        tally.seen["reserve"] += 1
        fn = _closing(client, held, call)
    else:
        fn = _charging(client, call)
    results: list[Any] = []
    for _ in range(2 if call.twice else 1):
        try:
            results.append(fn())
        except REFUSALS as refused:
            results.append(refused)
    _count(tally, call, results)


async def run_async(client: AsyncRedCredit, call: Call, tally: Tally) -> None:
    if call.kind == "abandon":
        try:
            await client.reserve(USERS[call.user], _hold(call), ttl=ABANDONED_TTL)
        except REFUSALS as refused:
            tally.seen[f"abandon refused: {type(refused).__name__}"] += 1
        else:
            tally.seen["abandon"] += 1
        return
    if call.kind in ("settle", "release"):
        try:
            held = await client.reserve(USERS[call.user], _hold(call), ttl=60)
        except REFUSALS as refused:
            tally.seen[f"reserve refused: {type(refused).__name__}"] += 1
            return
        tally.seen["reserve"] += 1
        fn = _closing(client, held, call)
    else:
        fn = _charging(client, call)
    # Sent twice, the two are in flight at once, as a retry after a timeout can be.
    sent = [fn() for _ in range(2 if call.twice else 1)]
    results = await asyncio.gather(*sent, return_exceptions=True)
    _count(tally, call, list(results))


def _process_spender(
    settings_json: str, seed: int, ready: Any, go: Any, results: multiprocessing.Queue
) -> None:
    client = RedCredit(settings=Settings.model_validate_json(settings_json))
    client.balance(USERS[seed % len(USERS)])  # connected and scripts loaded before the start
    ready.put(seed)
    go.wait(120)
    tally = Tally()
    for call in plan_calls(1000 + seed, list(range(len(USERS))), PROCESS_CALLS):
        run_sync(client, call, tally)
    client.close()
    results.put(tally.as_dict())


def _levels() -> dict[str, Scope]:
    levels = {ROOT: Scope(ROOT)}
    levels.update({t: Scope(ROOT, t) for t in TEAMS})
    levels.update({u.account: u for u in USERS})
    return levels


def _watch(settings: Settings, stop: threading.Event, seen: collections.Counter[str]) -> None:
    """Reads every level's hash again and again while the spenders run: never oversold.

    In a thread of its own, so the spenders' event loop does not slow it down; one
    pipeline a round (every key in the root's slot), one HMGET a level.
    """
    with RedCredit(settings=settings) as reader:
        hashes = {name: reader.engine.keys.for_account(name, ROOT).hash for name in _levels()}
        while not stop.is_set():
            pipe = reader.redis.pipeline(transaction=False)
            for key in hashes.values():
                pipe.hmget(key, "c", "h", "Kc", "Km", "Kh")
            for name, (c, h, kc, km, kh) in zip(hashes, pipe.execute(), strict=True):
                assert int(c) >= 0 and int(c) - int(h) >= 0, (name, c, h)
                cap = CAPS.get(name)
                if cap is not None and kc is not None:
                    if cap.credits is not None:
                        assert int(kc) + int(kh or 0) <= cap.credits, (name, kc, kh)
                    if cap.chat_messages is not None:
                        assert int(km) <= cap.chat_messages, (name, km)
            seen["watched"] += 1
            time.sleep(0.005)


async def _run_tree(settings: Settings) -> None:
    levels = _levels()
    with RedCredit(settings=settings) as rc:
        for team in TEAMS:
            rc.attach(Scope(ROOT, team))
        for user in USERS:
            rc.attach(user)
        rc.grant(ROOT, POOL, chat_messages=POOL_CHAT)
        for account, credits in OWN.items():
            rc.grant(levels[account], credits)
        for account, cap in CAPS.items():
            rc.set_cap(levels[account], cap)

        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = context.Queue()
        ready: multiprocessing.Queue = context.Queue()
        go = context.Event()
        dumped = settings.model_dump_json(context={"reveal_secrets": True})
        workers = [
            context.Process(target=_process_spender, args=(dumped, seed, ready, go, results))
            for seed in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        try:
            for _ in workers:
                ready.get(timeout=120)
            tally = Tally()
            async with AsyncRedCredit(settings=settings) as arc:
                await arc.ready()
                stop = threading.Event()
                watcher = concurrent.futures.ThreadPoolExecutor(1)
                watching = watcher.submit(_watch, settings, stop, tally.seen)

                async def spender(seed: int) -> None:
                    for call in plan_calls(
                        seed, [seed % len(USERS), (seed * 7 + 3) % len(USERS)], ASYNC_CALLS
                    ):
                        await run_async(arc, call, tally)

                go.set()
                await asyncio.gather(*(spender(s) for s in range(ASYNC_SPENDERS)))
                for _ in workers:
                    tally.add(Tally.from_dict(await asyncio.to_thread(results.get, timeout=300)))
                stop.set()
                watching.result(timeout=30)
                watcher.shutdown()
        finally:
            go.set()
            for worker in workers:
                worker.join(timeout=60)
        assert [w.exitcode for w in workers] == [0] * PROCESSES

        print("\n", ", ".join(f"{k} {n}" for k, n in sorted(tally.seen.items())))
        needed_kinds = ("spend", "chat", "turn", "settle", "release", "abandon", "spend replayed")
        for needed in (*needed_kinds, "watched"):
            assert tally.seen[needed] > 0, needed
        assert any("CapReached at user" in k for k in tally.seen), "no user's cap was reached"
        assert any("CapReached at team" in k for k in tally.seen), "no team's cap was reached"
        assert any("InsufficientCredits at org" in k for k in tally.seen), "the pool never ran dry"
        # Past the last abandoned hold's lease (server clock), with no process sweeping.
        await asyncio.sleep(ABANDONED_TTL + 0.5)
        _check_levels(rc, levels, tally)


def _check_levels(rc: RedCredit, levels: dict[str, Scope], tally: Tally) -> None:
    balances = {name: rc.balance(scope) for name, scope in levels.items()}
    # Nothing is held once every reservation is closed or lapsed, at any level.
    assert {n: b.held for n, b in balances.items() if b.held} == {}
    # What the callers were told was charged is exactly what left the levels' balances.
    granted = {ROOT: POOL, **OWN}
    left = {name: granted.get(name, 0) - balances[name].credits for name in levels}
    assert all(n >= 0 for n in left.values()), left
    assert sum(left.values()) == sum(tally.credits.values())
    assert POOL_CHAT - balances[ROOT].chat_messages == sum(tally.messages.values())
    assert all(b.chat_messages == 0 for n, b in balances.items() if n != ROOT)
    for name, b in balances.items():
        assert b.credits >= 0 and b.available >= 0, name
    # Every cap's use is what went through its level: its own user's, or its team's users'.
    for name, cap in CAPS.items():
        through = [u.account for u in USERS if name in u.path]
        kc, km, kh = rc.redis.hmget(rc.engine.keys.for_account(name, ROOT).hash, "Kc", "Km", "Kh")
        assert int(kc) == sum(tally.credits[u] for u in through), name
        assert int(km) == sum(tally.messages[u] for u in through), name
        assert int(kh) == 0, name
        if cap.credits is not None:
            assert int(kc) <= cap.credits, name
        if cap.chat_messages is not None:
            assert int(km) <= cap.chat_messages, name
    # The journal of the root's partition: per account, a gapless sequence summing to its
    # credits; no entry ever shows credits below zero or a cap's use past its ceiling.
    for name in levels:
        journal = entries(rc, ROOT, name)
        assert [int(e["s"]) for e in journal] == list(range(1, balances[name].sequence + 1)), name
        assert sum(int(e["dc"]) for e in journal) == balances[name].credits, name
        assert sum(int(e["dm"]) for e in journal) == balances[name].chat_messages, name
        assert all(int(e["c"]) >= 0 for e in journal), name
        cap = CAPS.get(name)
        for e in journal:
            if cap is not None and "kc" in e:
                assert cap.credits is None or int(e["kc"]) <= cap.credits, (name, e)
                assert cap.chat_messages is None or int(e["km"]) <= cap.chat_messages, (name, e)


async def test_a_tree_under_concurrent_spenders_stays_exact(scope_settings: Settings) -> None:
    # 200 callers and 8 processes on two loaded cores: a connection opened while the event
    # loop is that busy can take longer than the default second, which is no outage.
    patient = scope_settings.model_copy(
        update={
            "redis_connect_timeout": timedelta(seconds=15),
            "redis_socket_timeout": timedelta(seconds=15),
        }
    )
    await _run_tree(patient)
