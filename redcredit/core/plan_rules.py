"""The grant settings and every plan's rules, as the one string the scripts read (ARGV[7]).

The first line holds the grant settings: ``<burn order>|<categories>|<most
grants>|<default priority>``, the burn order as letters (``p`` priority,
``x`` expiry, ``c`` category, ``e`` effective start, ``d`` created) and the
categories comma-separated in burn order. Then ``\n*cal|<day>|<week>|<month>``:
the previous, current and next start of each calendar window of caps, in
UTC, comma-separated. Then one line per plan that has
rate limits, refills or an overdraft: ``\\n<plan>|<limits>|<refills>|<overdraft>``.

- limits, ``;``-separated: ``name,kind,rate,period_ms,burst,per_model,shadow``
  with kind ``r`` (requests, GCRA) or ``c`` (credit-weighted token bucket);
- refills, ``;``-separated: ``resource,amount,mode,rollover,expires_ms,
  category,priority,`` then ``r,period_ms`` (rolling) or ``c,start,start,start``
  (calendar); resource ``c`` (credits) or ``m`` (chat messages), mode ``a``
  (add) or ``t`` (top up to), rollover ``-1`` (all), ``0`` (none) or a cap,
  expires_ms ``0`` for never.

Calendar periods follow a time zone's rules (days of 23 or 25 hours, months
of any length), which the scripts cannot know: the client sends the starts of
the previous, current and next period, and the script picks the latest one
not after the *server's* time. The client's clock only chooses which three
starts to send, so a skew of less than a period changes nothing.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from ..config import GrantSettings, LimitSettings, PlanSettings, RefillSettings, Settings

__all__ = ["Rules", "cap_window_start"]


def _ms(duration: timedelta) -> int:
    return int(duration / timedelta(milliseconds=1))


def _limit(limit: LimitSettings) -> str:
    kind = "r" if limit.kind == "requests" else "c"
    return (
        f"{limit.name},{kind},{limit.rate},{_ms(limit.period)},{limit.capacity},"
        f"{int(limit.per_model)},{int(limit.shadow)}"
    )


def _period_starts(every: str, zone: ZoneInfo, now_s: float) -> tuple[int, int, int]:
    today = datetime.fromtimestamp(now_s, zone).date()
    if every == "day":
        current = today
        previous, following = current - timedelta(days=1), current + timedelta(days=1)
    elif every == "week":
        current = today - timedelta(days=today.weekday())
        previous, following = current - timedelta(days=7), current + timedelta(days=7)
    else:
        current = today.replace(day=1)
        previous = (current - timedelta(days=1)).replace(day=1)
        following = (current + timedelta(days=32)).replace(day=1)
    return tuple(_local_midnight_ms(day, zone) for day in (previous, current, following))  # type: ignore[return-value]


_CALENDAR = {"d": "day", "w": "week", "M": "month"}


def cap_window_start(period: str, now_ms: int) -> int:
    """The start of a cap's current window, as ``lua/_scopes.lua`` finds it: a cap's
    period is a calendar day, week or month in UTC ('d', 'w', 'M'), or a length in ms
    with windows aligned on the epoch."""
    if period in _CALENDAR:
        return _period_starts(_CALENDAR[period], ZoneInfo("UTC"), now_ms / 1000)[1]
    length = int(period)
    return now_ms - now_ms % length


def _local_midnight_ms(day: date, zone: ZoneInfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp() * 1000)


_CRITERIA = {"priority": "p", "expiry": "x", "category": "c", "effective": "e", "created": "d"}


def _grant_line(grants: GrantSettings) -> str:
    order = "".join(_CRITERIA[criterion] for criterion in grants.burn_order)
    categories = ",".join(grants.categories)
    return f"{order}|{categories}|{grants.max_grants}|{grants.default_priority}"


def _refill_terms(refill: RefillSettings) -> str:
    mode = "a" if refill.mode == "add" else "t"
    rollover = refill.rollover
    if isinstance(rollover, str):
        rollover = -1 if rollover == "all" else 0
    expires = 0 if refill.expires_in is None else _ms(refill.expires_in)
    return f"{mode},{rollover},{expires},{refill.category},{refill.priority}"


class Rules:
    """Builds the rules string, and rebuilds it only when a calendar period turns."""

    def __init__(self, settings: Settings) -> None:
        self._plans = {
            name: plan
            for name, plan in sorted(settings.plans.items())
            if plan.limits or plan.refill is not None or plan.overdraft
        }
        self._grants = _grant_line(settings.grants)
        self._text = ""
        # Without calendar refills the text never changes: valid forever.
        self._valid_until_s = float("-inf")

    def text(self, now_s: float | None = None) -> str:
        now_s = time.time() if now_s is None else now_s
        if now_s >= self._valid_until_s:
            self._text, self._valid_until_s = self._build(now_s)
        return self._text

    def _build(self, now_s: float) -> tuple[str, float]:
        lines = [self._grants]
        # The calendar windows of caps (lua/_scopes.lua), in UTC.
        utc = ZoneInfo("UTC")
        windows = [_period_starts(every, utc, now_s) for every in ("day", "week", "month")]
        lines.append("\n*cal|" + "|".join(",".join(map(str, w)) for w in windows))
        valid_until = windows[0][2] / 1000
        for name, plan in self._plans.items():
            refills, next_start = self._refills(plan, now_s)
            valid_until = min(valid_until, next_start)
            limits = ";".join(_limit(limit) for limit in plan.limits)
            lines.append(f"\n{name}|{limits}|{refills}|{plan.overdraft}")
        return "".join(lines), valid_until

    def _refills(self, plan: PlanSettings, now_s: float) -> tuple[str, float]:
        refill: RefillSettings | None = plan.refill
        if refill is None:
            return "", float("inf")
        if isinstance(refill.every, timedelta):
            schedule = f"r,{_ms(refill.every)}"
            next_start = float("inf")
        else:
            starts = _period_starts(refill.every, ZoneInfo(refill.timezone), now_s)
            schedule = "c," + ",".join(map(str, starts))
            next_start = starts[2] / 1000
        parts = []
        terms = _refill_terms(refill)
        if refill.credits:
            parts.append(f"c,{refill.credits},{terms},{schedule}")
        if refill.chat_messages:
            parts.append(f"m,{refill.chat_messages},{terms},{schedule}")
        return ";".join(parts), next_start
