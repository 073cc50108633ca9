"""The I/O-free core: validates arguments, builds script calls, runs them to a result.

Each operation is a generator that yields the I/O it needs (a script call, or
an account to load) and receives the answer; the sync and async clients only
drive these generators. The rules are therefore written once, here and in the
Lua scripts, and the clients cannot drift apart.

Every argument is validated when the operation is created, before the client
touches Redis. Replies are read by the pure parsers of :mod:`.replies`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from .. import validation as v
from ..config import Settings
from ..errors import ConfigError, InvalidInput
from ..results import (
    Balance,
    BalanceChange,
    PlanChange,
    Reservation,
    ReservationRef,
    Settlement,
    SpendResult,
    Void,
)
from . import grants, replies
from .keys import AccountKeys, KeySpace
from .loader import AccountSnapshot
from .plan_rules import Rules
from .replies import Reply, Status
from .scripts import load_scripts
from .steps import LoadAccount, Operation, ScriptCall, Step, check_durable

__all__ = ["Engine", "LoadAccount", "Operation", "ReservationLike", "ScriptCall", "check_durable"]

T = TypeVar("T")

ReservationLike = Reservation | ReservationRef


class Engine:
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
        self._idem_window_ms = _ms(settings.idempotency_window)
        self._retention_ms = _ms(settings.reservation_retention)
        self._ttl_default_ms = _ms(settings.reservation_ttl)
        self._ttl_min_ms = _ms(settings.reservation_ttl_min)
        self._ttl_max_ms = _ms(settings.reservation_ttl_max)
        wait_ms = _ms(settings.durability_timeout)
        self._wait: tuple[str | int, ...] | None = {
            "none": None,
            "aof": ("WAITAOF", 1, 0, wait_ms),
            "replica": ("WAIT", 1, wait_ms),
        }[settings.durability]

    # -- building blocks -------------------------------------------------------

    def _call(
        self,
        script: str,
        keys: AccountKeys,
        idempotency_key: str | None,
        fingerprint: str,
        args: Sequence[str | int],
        extra_keys: Sequence[str] = (),
        model: str = "",
    ) -> ScriptCall:
        return ScriptCall(
            self.scripts[script],
            [*keys.common(idempotency_key), *extra_keys],
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

    def _run(self, call: ScriptCall, keys: AccountKeys) -> Generator[Step, Any, Reply]:
        """Runs a call; an account missing from Redis is loaded, inserted, and the call retried."""
        while True:
            reply: Reply = yield call
            if reply[0] != Status.MISSING:
                return reply
            snapshot: AccountSnapshot = yield LoadAccount(keys.account)
            yield self._hydrate(keys, snapshot)

    def _hydrate(self, keys: AccountKeys, snapshot: AccountSnapshot) -> ScriptCall:
        plan = v.check_plan_name(snapshot.plan)
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
        keys: AccountKeys,
        parse: Callable[[Reply], T],
        reservation_id: str = "",
        grant_id: str = "",
    ) -> Operation[T]:
        """Runs a call, raises the refusal its reply stands for, or parses its success."""
        reply = yield from self._run(call, keys)
        refused = replies.refusal(reply, keys.account, reservation_id, grant_id)
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

    # -- operations ------------------------------------------------------------

    def spend(
        self,
        account: str,
        feature: str | None = None,
        *,
        cost: int | None = None,
        units: int | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[SpendResult]:
        """Spends credits, priced from the cost table by feature or given as ``cost``."""
        credits, feature_name = self._price(feature, cost, units)
        return self._debit_op(account, "spend", credits, 0, feature_name, model, idempotency_key)

    def spend_chat_message(
        self,
        account: str,
        *,
        messages: int = 1,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[SpendResult]:
        messages = v.check_amount(messages, name="messages", allow_zero=False)
        return self._debit_op(account, "chat", 0, messages, "", model, idempotency_key)

    def chat_turn(
        self,
        account: str,
        feature: str | None = None,
        *,
        cost: int | None = None,
        units: int | None = None,
        messages: int = 1,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[SpendResult]:
        """Spends chat messages and credits together: a refused turn spends neither."""
        credits, feature_name = self._price(feature, cost, units)
        messages = v.check_amount(messages, name="messages", allow_zero=False)
        return self._debit_op(
            account, "turn", credits, messages, feature_name, model, idempotency_key
        )

    def _debit_op(
        self,
        account: str,
        op: str,
        credits: int,
        messages: int,
        feature_name: str,
        model: str | None,
        idempotency_key: str | None,
    ) -> Operation[SpendResult]:
        account = v.check_account_id(account)
        model_name = _model(model)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        keys = self.keys.for_account(account)
        call = self._call(
            "debit",
            keys,
            idempotency_key,
            # "|" is in no feature or model name (":" is): a:b + c differs from a + b:c.
            f"{op}:{credits}:{messages}:{feature_name}|{model_name}",
            [credits, messages, feature_name, op],
            model=model_name,
        )
        return self._run_parsed(call, keys, partial(replies.spend_result, account=account))

    def grant(
        self,
        account: str,
        credits: int = 0,
        *,
        chat_messages: int = 0,
        category: str | None = None,
        priority: int | None = None,
        effective_at: datetime | None = None,
        expires_at: datetime | None = None,
        expires_in: int | timedelta | None = None,
        grant_id: str | None = None,
        new_grant_id: str = "",
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[BalanceChange]:
        """Adds credits and/or chat messages (a top-up, keyed by e.g. a payment id).

        With any of ``category``, ``priority``, ``effective_at``, ``expires_at``,
        ``expires_in`` or ``grant_id`` the credits make a bucket of their own
        (``new_grant_id`` names it when ``grant_id`` does not); otherwise they
        join the base bucket.
        """
        credits = v.check_amount(credits, name="credits")
        chat_messages = v.check_amount(chat_messages, name="chat_messages")
        bucket_args = (category, priority, effective_at, expires_at, expires_in, grant_id)
        if all(arg is None for arg in bucket_args):
            return self._adjust_op(
                account, "grant", credits, chat_messages, reason, idempotency_key
            )
        account = v.check_account_id(account)
        bucket = grants.BucketGrant.of(
            self.settings.grants,
            credits=credits,
            category=category,
            priority=priority,
            effective_at=effective_at,
            expires_at=expires_at,
            expires_in=expires_in,
            grant_id=grant_id,
            new_grant_id=new_grant_id,
        )
        idempotency_key = v.check_idempotency_key(idempotency_key)
        reason_text = "" if reason is None else v.check_reason(reason)
        keys = self.keys.for_account(account)
        call = self._call(
            "grant",
            keys,
            idempotency_key,
            f"{credits}:{bucket.fingerprint(chat_messages)}|{reason_text}",
            [credits, chat_messages, *bucket.args(), reason_text],
        )
        return self._run_parsed(
            call, keys, partial(replies.grant_change, account=account), grant_id=bucket.id
        )

    def void(
        self,
        account: str,
        grant_id: str,
        *,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[Void]:
        """Takes back what is left of a grant; what was spent of it stays spent."""
        account = v.check_account_id(account)
        grant_id = v.check_grant_id(grant_id)
        reason_text = "" if reason is None else v.check_reason(reason)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        keys = self.keys.for_account(account)
        call = self._call(
            "void", keys, idempotency_key, f"void:{grant_id}|{reason_text}", [grant_id, reason_text]
        )
        parse = partial(replies.void, account=account, grant_id=grant_id)
        return self._run_parsed(call, keys, parse, grant_id=grant_id)

    def correct(
        self,
        account: str,
        credits: int = 0,
        *,
        chat_messages: int = 0,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[BalanceChange]:
        """Adds or removes balances (signed deltas); never below the active holds or zero."""
        credits = v.check_signed_amount(credits, name="credits")
        chat_messages = v.check_signed_amount(chat_messages, name="chat_messages")
        return self._adjust_op(account, "correct", credits, chat_messages, reason, idempotency_key)

    def _adjust_op(
        self,
        account: str,
        op: str,
        credits: int,
        chat_messages: int,
        reason: str | None,
        idempotency_key: str | None,
    ) -> Operation[BalanceChange]:
        account = v.check_account_id(account)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        if credits == 0 and chat_messages == 0:
            raise InvalidInput(f"a {op} must change credits or chat messages")
        reason_text = "" if reason is None else v.check_reason(reason)
        keys = self.keys.for_account(account)
        call = self._call(
            "adjust",
            keys,
            idempotency_key,
            f"{op}:{credits}:{chat_messages}:{reason_text}",
            [credits, chat_messages, op, reason_text],
        )
        return self._run_parsed(call, keys, partial(replies.balance_change, account=account))

    def set_plan(
        self, account: str, plan: str, *, idempotency_key: str | None = None
    ) -> Operation[PlanChange]:
        account = v.check_account_id(account)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        plan = self.settings.require_plan(plan)
        keys = self.keys.for_account(account)
        call = self._call("set_plan", keys, idempotency_key, f"plan:{plan}", [plan])
        return self._run_parsed(
            call, keys, partial(replies.plan_change, account=account, plan=plan)
        )

    def balance(self, account: str, *, model: str | None = None) -> Operation[Balance]:
        account = v.check_account_id(account)
        model_name = _model(model)
        keys = self.keys.for_account(account)
        call = self._call("balance", keys, None, "", [], model=model_name)
        return self._run_parsed(call, keys, partial(replies.balance, account=account))

    def reserve(
        self,
        account: str,
        amount: int,
        *,
        ttl: int | timedelta | None = None,
        feature: str | None = None,
        messages: int = 0,
        model: str | None = None,
        reservation_id: str,
        idempotency_key: str | None = None,
    ) -> Operation[Reservation]:
        """Holds credits (and spends ``messages`` chat messages) until the lease ends."""
        account = v.check_account_id(account)
        amount = v.check_amount(amount, name="amount", allow_zero=False)
        messages = v.check_amount(messages, name="messages")
        model_name = _model(model)
        ttl_ms = self.ttl_ms(ttl)
        feature_name = "" if feature is None else v.check_feature_name(feature)
        reservation_id = v.check_reservation_id(reservation_id)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        keys = self.keys.for_account(account)
        # The reservation id is left out of the fingerprint: a retry with the
        # same idempotency key makes a new id, and must get the first one back.
        call = self._call(
            "reserve",
            keys,
            idempotency_key,
            f"reserve:{amount}:{ttl_ms}:{feature_name}:{messages}:{model_name}",
            [amount, ttl_ms, reservation_id, self._retention_ms, feature_name, messages],
            [keys.reservation(reservation_id)],
            model=model_name,
        )
        parse = partial(replies.reservation, account=account, amount=amount)
        return self._run_parsed(call, keys, parse, reservation_id)

    def reset_limits(
        self, account: str, name: str | None = None, *, idempotency_key: str | None = None
    ) -> Operation[int]:
        """Forgets the state of one rate limit (or all) of an account; journaled."""
        account = v.check_account_id(account)
        limit = "" if name is None else v.check_limit_name(name)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        keys = self.keys.for_account(account)
        call = self._call("reset_limits", keys, idempotency_key, f"reset_limits:{limit}", [limit])
        return self._run_parsed(call, keys, replies.limit_reset)

    def close_reservation(
        self,
        reservation: ReservationLike,
        *,
        release: bool,
        actual: int = 0,
        allow_late: bool = False,
        idempotency_key: str | None = None,
    ) -> Operation[Settlement]:
        """Settles (charging ``actual``) or releases a reservation."""
        account, reservation_id = v.check_reservation_parts(reservation)
        actual = 0 if release else v.check_amount(actual, name="actual")
        if type(allow_late) is not bool:
            raise InvalidInput(f"allow_late must be a bool, not {type(allow_late).__name__}")
        idempotency_key = v.check_idempotency_key(idempotency_key)
        mode = "release" if release else "settle"
        keys = self.keys.for_account(account)
        call = self._call(
            "settle",
            keys,
            idempotency_key,
            f"{mode}:{reservation_id}:{actual}:{int(allow_late)}",
            [mode, actual, reservation_id, int(allow_late), self._retention_ms],
            [keys.reservation(reservation_id)],
        )
        parse = partial(replies.settlement, account=account, reservation_id=reservation_id)
        return self._run_parsed(call, keys, parse, reservation_id)

    def extend(
        self, reservation: ReservationLike, *, ttl: int | timedelta | None = None
    ) -> Operation[Reservation]:
        """Renews the lease to now + ttl (server clock)."""
        account, reservation_id = v.check_reservation_parts(reservation)
        ttl_ms = self.ttl_ms(ttl)
        keys = self.keys.for_account(account)
        call = self._call(
            "extend",
            keys,
            None,
            "",
            [ttl_ms, reservation_id, self._retention_ms],
            [keys.reservation(reservation_id)],
        )
        parse = partial(
            replies.reservation_extended, account=account, reservation_id=reservation_id
        )
        return self._run_parsed(call, keys, parse, reservation_id)


def _model(model: str | None) -> str:
    return "" if model is None else v.check_model_name(model)


def _ms(duration: timedelta) -> int:
    return int(duration / timedelta(milliseconds=1))
