"""The rules of docs/scopes.md restated in plain Python, for the scope model test.

No I/O: ``test_model_scopes.py`` drives the real server and this model side by
side. A tree of accounts, each level with credits, chat messages, a plan and
maybe a cap; a call on a path checks every level's cap (leaf first), then what
the path can pay, and takes credits and chat messages from the nearest level
that has them free, a bypassing level paying for what is left, overdrafts
drawn last, nearest first. Caps count what passes through their level from
the moment they are set, per fixed-length window aligned on the epoch, and
every live reservation made through a capped level counts there in full until
it closes. Holds count until their deadline and for nothing from it on.

Times are model milliseconds; the test runs the server a small lag ahead of
a whole multiple of every window, so the model's instants decide exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

UNBOUNDED = 2**53


class Refused(Exception):
    """The call must be refused with this error (by class name) and these attributes."""

    def __init__(self, error: str, **details: object) -> None:
        super().__init__(error, details)
        self.error = error
        self.details = details


@dataclass(frozen=True)
class Plan:
    bypass: bool = False
    overdraft: int = 0


@dataclass(frozen=True)
class CapRule:
    credits: int | None
    messages: int | None
    window: int  # ms


@dataclass
class Level:
    name: str
    path: tuple[str, ...]  # root first, ending with the level itself
    credits: int = 0
    chat: int = 0
    plan: str = "free"
    cap: CapRule | None = None
    # The window the use below is of (its start), and the use in it.
    window: int | None = None
    used_credits: int = 0
    used_messages: int = 0


@dataclass
class Hold:
    rid: str
    path: tuple[str, ...]
    amount: int
    deadline: int
    parts: dict[str, int]  # credits held at each level that backs it
    counted: frozenset[str]  # the levels whose cap counts it (capped when it was made)
    bypass: bool  # the account's plan bypassed when it was made
    closed: bool = False


@dataclass
class Tree:
    plans: dict[str, Plan]
    levels: dict[str, Level] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    now: int = 0
    # The entries the last charge journals: (account, depth, credit delta, chat delta).
    entries: list[tuple[str, int, int, int]] = field(default_factory=list)

    def add(self, *path: str) -> None:
        self.levels[path[-1]] = Level(path[-1], path)

    def trial(self) -> Tree:
        return copy.deepcopy(self)

    # -- what a level has, now -----------------------------------------------------------------

    def path_levels(self, account: str) -> list[Level]:
        """The levels of a call on ``account``: itself first, the root last."""
        return [self.levels[name] for name in reversed(self.levels[account].path)]

    def live(self, hold: Hold) -> bool:
        return not hold.closed and self.now < hold.deadline

    def held(self, name: str) -> int:
        return sum(h.parts.get(name, 0) for h in self.holds.values() if self.live(h))

    def cap_held(self, name: str) -> int:
        return sum(h.amount for h in self.holds.values() if self.live(h) and name in h.counted)

    def bypass(self, level: Level) -> bool:
        return self.plans[level.plan].bypass

    def overdraft(self, level: Level) -> int:
        return self.plans[level.plan].overdraft

    def window(self, cap: CapRule) -> tuple[int, int]:
        start = self.now - self.now % cap.window
        return start, start + cap.window

    def use(self, level: Level) -> tuple[int, int]:
        """Credits and messages counted by the level's cap in the current window."""
        if level.cap is None or level.window != self.window(level.cap)[0]:
            return 0, 0
        return level.used_credits, level.used_messages

    # -- the shared steps ----------------------------------------------------------------------

    def check_caps(self, levels: list[Level], credits: int, messages: int) -> None:
        for level in levels:
            cap = level.cap
            if cap is None:
                continue
            used_c, used_m = self.use(level)
            held = self.cap_held(level.name)
            wait = self.window(cap)[1] - self.now
            if cap.credits is not None and used_c + held + credits > cap.credits:
                raise Refused(
                    "CapReached",
                    level=level.name,
                    resource="credits",
                    cap=cap.credits,
                    used=used_c + held,
                    wait=wait,
                )
            if cap.messages is not None and used_m + messages > cap.messages:
                raise Refused(
                    "CapReached",
                    level=level.name,
                    resource="messages",
                    cap=cap.messages,
                    used=used_m,
                    wait=wait,
                )

    def funds(self, levels: list[Level], bypasses: list[bool]) -> tuple[int, int]:
        """What the path can pay: credits (overdrafts included) and chat messages."""
        if len(levels) == 1:
            # Alone, an account below zero pays nothing and says by how much it is short.
            level = levels[0]
            if bypasses[0]:
                return UNBOUNDED, UNBOUNDED
            return level.credits - self.held(level.name) + self.overdraft(level), level.chat
        if any(bypasses):
            return UNBOUNDED, UNBOUNDED
        credits = sum(max(lv.credits - self.held(lv.name) + self.overdraft(lv), 0) for lv in levels)
        return credits, sum(lv.chat for lv in levels)

    def split(
        self, levels: list[Level], credits: int, messages: int, bypasses: list[bool]
    ) -> tuple[list[int], list[int], list[bool]]:
        """Who pays: free credits and messages nearest first, a bypassing level for the
        rest (it covers it), then overdrafts nearest first."""
        paid_c, paid_m = [0] * len(levels), [0] * len(levels)
        covered = [False] * len(levels)
        need_c, need_m = credits, messages
        for i, level in enumerate(levels):
            if bypasses[i]:
                covered[i] = need_c > 0 or need_m > 0
                need_c = need_m = 0
                continue
            paid_c[i] = min(max(level.credits - self.held(level.name), 0), need_c)
            paid_m[i] = min(level.chat, need_m)
            need_c, need_m = need_c - paid_c[i], need_m - paid_m[i]
        for i, level in enumerate(levels):
            room = level.credits - self.held(level.name) - paid_c[i] + self.overdraft(level)
            n = min(max(room, 0), need_c)
            paid_c[i], need_c = paid_c[i] + n, need_c - n
        assert need_c == 0 and need_m == 0, "split a charge the path cannot pay"
        return paid_c, paid_m, covered

    def count(self, level: Level, credits: int, messages: int) -> None:
        """Counts a charge against the level's cap (nothing without a cap)."""
        if level.cap is None:
            return
        used_c, used_m = self.use(level)
        level.window = self.window(level.cap)[0]
        level.used_credits, level.used_messages = used_c + credits, used_m + messages

    def charge(
        self,
        levels: list[Level],
        credits: int,
        messages: int,
        bypasses: list[bool],
        held: frozenset[str] = frozenset(),
    ) -> None:
        """Applies a charge. Every level that pays, covers it, counts it in its cap (or
        ``held`` a part of the reservation it closes) journals an entry, and the call's
        account always does."""
        paid_c, paid_m, covered = self.split(levels, credits, messages, bypasses)
        self.entries = []
        for i, level in enumerate(levels):
            level.credits -= paid_c[i]
            level.chat -= paid_m[i]
            self.count(level, credits, messages)
            journals = paid_c[i] or paid_m[i] or level.cap is not None or covered[i]
            if i == 0 or journals or level.name in held:
                depth = len(levels) - i
                self.entries.append((level.name, depth, -paid_c[i], -paid_m[i]))

    def short(self, levels: list[Level], error: str, required: int, available: int) -> Refused:
        return Refused(error, level=levels[-1].name, required=required, available=available)

    # -- the calls -----------------------------------------------------------------------------

    def spend(self, account: str, cost: int, messages: int) -> tuple[int | None, int | None]:
        """A spend or a chat turn; returns what the account itself has left."""
        levels = self.path_levels(account)
        bypasses = [self.bypass(lv) for lv in levels]
        self.check_caps(levels, cost, messages)
        credits, chat = self.funds(levels, bypasses)
        if cost > credits:
            raise self.short(levels, "InsufficientCredits", cost, credits)
        if messages > chat:
            raise self.short(levels, "InsufficientChatMessages", messages, chat)
        self.charge(levels, cost, messages, bypasses)
        leaf = levels[0]
        if bypasses[0]:
            return None, None
        return leaf.credits, leaf.chat

    def reserve(self, account: str, rid: str, amount: int, ttl: int, messages: int) -> Hold:
        levels = self.path_levels(account)
        bypasses = [self.bypass(lv) for lv in levels]
        self.check_caps(levels, amount, messages)
        parts, rooms, need, covered = [0] * len(levels), [0] * len(levels), amount, False
        for i, level in enumerate(levels):
            if covered:
                continue
            if bypasses[i]:
                covered, need = True, 0
                continue
            available = level.credits - self.held(level.name)
            free = max(available, 0)
            rooms[i] = max(available + self.overdraft(level), 0) - free
            parts[i] = min(free, need)
            need -= parts[i]
        for i in range(len(levels)):
            n = min(rooms[i], need)
            parts[i], need = parts[i] + n, need - n
        if need > 0:
            if len(levels) == 1:
                leaf = levels[0]
                could = leaf.credits - self.held(leaf.name) + self.overdraft(leaf)
            else:
                could = sum(parts)
            raise self.short(levels, "InsufficientCredits", amount, could)
        chat = self.funds(levels, bypasses)[1]
        if messages > chat:
            raise self.short(levels, "InsufficientChatMessages", messages, chat)
        _, paid_m, _ = self.split(levels, 0, messages, bypasses)
        for i, level in enumerate(levels):
            level.chat -= paid_m[i]
            self.count(level, 0, messages)
        hold = Hold(
            rid,
            self.levels[account].path,
            amount,
            self.now + ttl,
            {lv.name: parts[i] for i, lv in enumerate(levels) if parts[i]},
            frozenset(lv.name for lv in levels if lv.cap is not None),
            bypasses[0],
        )
        self.holds[rid] = hold
        return hold

    def close(self, rid: str, actual: int | None, allow_late: bool) -> tuple[str, int, int | None]:
        """Settles (``actual``) or releases (None) an open hold: (outcome, charged, left)."""
        hold = self.holds[rid]
        lapsed = self.now >= hold.deadline
        if lapsed and actual is not None and not allow_late:
            raise Refused("ReservationLapsed")
        hold.closed = True
        levels = self.path_levels(hold.path[-1])
        # A level that held a part, or whose cap counted it, journals that it lets go.
        had = frozenset() if lapsed else frozenset(hold.parts) | hold.counted
        # The account's plan when the hold was made decides for the account itself.
        bypasses = [hold.bypass] + [self.bypass(lv) for lv in levels[1:]]
        charged = 0
        if actual is not None:
            charged = max(min(actual, self.funds(levels, bypasses)[0]), 0)
            for level in levels:
                cap = level.cap
                if cap is not None and cap.credits is not None:
                    room = cap.credits - self.use(level)[0] - self.cap_held(level.name)
                    charged = min(charged, max(room, 0))
        self.charge(levels, charged, 0, bypasses, had)
        outcome = "released" if actual is None else "settled_late" if lapsed else "settled"
        return outcome, charged, None if hold.bypass else levels[0].credits

    def extend(self, rid: str, ttl: int) -> None:
        hold = self.holds[rid]
        if hold.closed:
            raise Refused("ReservationClosed")
        if self.now >= hold.deadline:
            raise Refused("ReservationLapsed")
        hold.deadline = self.now + ttl

    def grant(self, account: str, credits: int, messages: int) -> None:
        level = self.levels[account]
        level.credits += credits
        level.chat += messages

    def set_cap(self, account: str, cap: CapRule | None) -> None:
        """Sets a cap (the current window's use is kept) or removes it (its use goes)."""
        level = self.levels[account]
        level.cap = cap
        if cap is None:
            level.window, level.used_credits, level.used_messages = None, 0, 0

    def next_instants(self) -> list[int]:
        """Every deadline and window turn still to come."""
        due = [h.deadline for h in self.holds.values() if self.live(h)]
        due += [self.window(lv.cap)[1] for lv in self.levels.values() if lv.cap is not None]
        return sorted(t for t in due if t > self.now)
