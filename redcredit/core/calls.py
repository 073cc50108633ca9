"""The machinery every operation of the engine shares: script calls, loading a
missing account, refusals raised (see :mod:`.engine` for the operations)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from .. import validation as v
from ..config import Settings
from ..errors import ConfigError, InvalidInput
from . import grants, replies
from .keys import AccountKeys, KeySpace
from .loader import AccountSnapshot
from .plan_rules import Rules
from .replies import Reply, Status
from .scripts import load_scripts
from .steps import LoadAccount, Operation, ScriptCall, Step
from .targets import Target, check_snapshot_place

__all__ = ["EngineBase", "checked_model", "ms"]

T = TypeVar("T")


class EngineBase:
    """Validates, builds and runs script calls for one deployment's settings."""

    """Validates, builds and parses every operation for one deployment's settings."""

    def __init__(self, settings: Settings) -> None:
        if not isinstance(settings, Settings):
            # Only the type is shown: a mapping of settings may hold passwords.
            raise ConfigError(
                f"settings must be a redcredit Settings, not {type(settings).__name__}"
            )
        self.settings = settings
        self.keys = KeySpace(settings.versioned_prefix, settings.partitions)
        self.scripts = load_scripts()
        self.costs = settings.costs
        self.rules = Rules(settings)
        # Only tests move the clock: it shifts the server's TIME inside scripts.
        self.clock_offset_ms = 0
        self._bypass = "|" + "|".join(settings.bypass_plans) + "|"
        self._idem_window_ms = ms(settings.idempotency_window)
        self._retention_ms = ms(settings.reservation_retention)
        self._ttl_default_ms = ms(settings.reservation_ttl)
        self._ttl_min_ms = ms(settings.reservation_ttl_min)
        self._ttl_max_ms = ms(settings.reservation_ttl_max)
        wait_ms = ms(settings.durability_timeout)
        self._wait: tuple[str | int, ...] | None = {
            "none": None,
            "aof": ("WAITAOF", 1, 0, wait_ms),
            "replica": ("WAIT", 1, wait_ms),
        }[settings.durability]

    # -- building blocks -------------------------------------------------------

    def _call(
        self,
        script: str,
        where: Target | AccountKeys,
        idempotency_key: str | None,
        fingerprint: str,
        args: Sequence[str | int],
        extra_keys: Sequence[str] = (),
        model: str = "",
    ) -> ScriptCall:
        keys, ancestors = (
            (where.keys, where.ancestors) if isinstance(where, Target) else (where, ())
        )
        return ScriptCall(
            self.scripts[script],
            [*keys.common(idempotency_key), *extra_keys, *ancestors],
            [
                keys.account,
                self.clock_offset_ms,
                idempotency_key or "",
                fingerprint,
                self._idem_window_ms,
                self._bypass,
                self.rules.text(),
                model,
                *args,
            ],
            # Reads need no wait; a hydration is waited for by the call it serves.
            wait=None if script in ("balance", "hydrate") else self._wait,
        )

    def _run(self, call: ScriptCall, target: Target) -> Generator[Step, Any, Reply]:
        """Runs a call; an account of its path missing from Redis is loaded, inserted,
        and the call retried."""
        while True:
            reply: Reply = yield call
            if reply[0] != Status.MISSING:
                return reply
            account = target.account if len(reply) < 3 else replies.text(reply[2])
            snapshot: AccountSnapshot = yield LoadAccount(account)
            check_snapshot_place(target, account, snapshot)
            hydrated: Reply = yield self._hydrate(target.level_keys(self.keys, account), snapshot)
            if hydrated[0] == Status.MOVED:
                raise replies.moved(target.account, account, replies.text(hydrated[3]))

    def _run_counted(
        self,
        make: Callable[[str], ScriptCall],
        target: Target,
        uncounted: Callable[[str], Exception] | None = None,
    ) -> Generator[Step, Any, Reply]:
        """Runs a call that counts children (attach, move_in, move_out): a level whose
        hash has no count yet gets the system of record's, and the call is made again.

        Where the system of record keeps no count either, ``uncounted`` makes the
        refusal; without it the level is left uncounted."""
        counts: dict[str, int] = {}
        while True:
            text = "".join(f"{account}\n{n}\n" for account, n in counts.items())
            reply = yield from self._run(make(text), target)
            if reply[0] != Status.UNCOUNTED:
                return reply
            level = replies.text(reply[2])
            if level in counts:
                return reply
            snapshot: AccountSnapshot = yield LoadAccount(level)
            if snapshot.children is None and uncounted is not None:
                raise uncounted(level)
            counts[level] = -1 if snapshot.children is None else snapshot.children

    def _hydrate(self, keys: AccountKeys, snapshot: AccountSnapshot) -> ScriptCall:
        plan = v.check_plan_name(snapshot.plan)
        refilled = [(r, at) for r, at in snapshot.refilled if r in ("c", "m")]
        record_keys: list[str] = []
        records: list[int] = []
        for key, sequence, left_ms in snapshot.applied_keys:
            record_keys.append(keys.idempotency(v.check_idempotency_key(key)))
            records += [v.check_amount(sequence, name="sequence"), max(int(left_ms), 1)]
        return self._call(
            "hydrate",
            keys,
            None,
            "",
            [
                self._opening_credits(snapshot.credits, plan),
                v.check_amount(snapshot.chat_messages, name="chat_messages"),
                plan,
                v.check_amount(snapshot.sequence, name="sequence"),
                1 if snapshot.sequence == 0 else 0,
                ";".join(map(grants.hydrated, snapshot.buckets)),
                snapshot.parent or "",
                snapshot.root or "",
                snapshot.cap,
                snapshot.cap_use,
                ";".join(f"{r},{v.check_amount(at, name='refilled')}" for r, at in refilled),
                ""
                if snapshot.children is None
                else v.check_amount(snapshot.children, name="children"),
                *records,
            ],
            extra_keys=record_keys,
        )

    def _opening_credits(self, credits: object, plan: str) -> int:
        """Credits of a snapshot: below zero only within its plan's overdraft."""
        credits = v.check_signed_amount(credits, name="credits")
        known = self.settings.plans.get(plan)
        overdraft = 0 if known is None else known.overdraft
        if credits < -overdraft:
            raise InvalidInput(
                f"credits must be at least {-overdraft} on plan {plan!r} (its overdraft), "
                f"not {credits}"
            )
        return credits

    def ttl_ms(self, ttl: int | timedelta | None) -> int:
        if ttl is None:
            return self._ttl_default_ms
        return v.check_duration_ms(
            ttl, name="ttl", minimum_ms=self._ttl_min_ms, maximum_ms=self._ttl_max_ms
        )

    def _run_parsed(
        self,
        call: ScriptCall,
        target: Target,
        parse: Callable[[Reply], T],
        reservation_id: str = "",
        grant_id: str = "",
    ) -> Operation[T]:
        """Runs a call, raises the refusal its reply stands for, or parses its success."""
        reply = yield from self._run(call, target)
        refused = replies.refusal(reply, target.account, reservation_id, grant_id)
        if refused is not None:
            raise refused
        return parse(reply)

    def _price(self, feature: str | None, cost: int | None, units: int | None) -> tuple[int, str]:
        if feature is None and cost is None:
            raise InvalidInput("give a feature name or an explicit cost")
        if feature is not None and cost is not None:
            raise InvalidInput("give either a feature name or an explicit cost, not both")
        if feature is not None:
            feature = v.check_feature_name(feature)
            return self.costs.price(feature, units), feature
        if units is not None:
            raise InvalidInput("units only apply to a feature priced per unit")
        return v.check_amount(cost, name="cost"), ""


def checked_model(model: str | None) -> str:
    return "" if model is None else v.check_model_name(model)


def ms(duration: timedelta) -> int:
    return int(duration / timedelta(milliseconds=1))
