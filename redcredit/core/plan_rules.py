"""Rate limits and refills of every plan, as the one string the scripts read (ARGV[7]).

One line per plan that has any: ``\\n<plan>|<limits>|<refills>``.

- limits, ``;``-separated: ``name,kind,rate,period_ms,burst,per_model,shadow``
  with kind ``r`` (requests, GCRA) or ``c`` (credit-weighted token bucket);
- refills, ``;``-separated: ``resource,amount,r,period_ms`` (rolling) or
  ``resource,amount,c,start,start,start`` (calendar), resource ``c`` (credits)
  or ``m`` (chat messages).

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

from ..config import LimitSettings, PlanSettings, RefillSettings, Settings

__all__ = ["Rules"]


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


def _local_midnight_ms(day: date, zone: ZoneInfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp() * 1000)


class Rules:
    """Builds the rules string, and rebuilds it only when a calendar period turns."""

    def __init__(self, settings: Settings) -> None:
        self._plans = {
            name: plan
            for name, plan in sorted(settings.plans.items())
            if plan.limits or plan.refill is not None
        }
        self._text = ""
        # Without calendar refills the text never changes: valid forever.
        self._valid_until_s = float("-inf")

    def text(self, now_s: float | None = None) -> str:
        now_s = time.time() if now_s is None else now_s
        if now_s >= self._valid_until_s:
            self._text, self._valid_until_s = self._build(now_s)
        return self._text

    def _build(self, now_s: float) -> tuple[str, float]:
        lines = []
        valid_until = float("inf")
        for name, plan in self._plans.items():
            refills, next_start = self._refills(plan, now_s)
            valid_until = min(valid_until, next_start)
            limits = ";".join(_limit(limit) for limit in plan.limits)
            lines.append(f"\n{name}|{limits}|{refills}")
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
        if refill.credits:
            parts.append(f"c,{refill.credits},{schedule}")
        if refill.chat_messages:
            parts.append(f"m,{refill.chat_messages},{schedule}")
        return ";".join(parts), next_start
