"""The I/O-free core: validates arguments, builds script calls, runs them to a result.

Each operation is a generator that yields the I/O it needs (a script call, or
an account to load) and receives the answer; the sync and async clients only
drive these generators. The rules are therefore written once, here and in the
Lua scripts, and the clients cannot drift apart.

Every argument is validated when the operation is created, before the client
touches Redis. Replies are read by the pure parsers of :mod:`.replies`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import TypeVar

from .. import validation as v
from ..errors import InvalidInput
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
from ..scopes import Scope
from . import grants, replies
from .calls import checked_model
from .moves import MoveOperations
from .steps import LoadAccount, Operation, ScriptCall, check_durable
from .targets import Target
from .tree_ops import TreeOperations

__all__ = ["Engine", "LoadAccount", "Operation", "ReservationLike", "ScriptCall", "check_durable"]

T = TypeVar("T")

ReservationLike = Reservation | ReservationRef


class Engine(TreeOperations, MoveOperations):
    """Every operation, validated when made, for one deployment's settings."""

    # -- operations ------------------------------------------------------------

    def spend(
        self,
        account: str | Scope,
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
        account: str | Scope,
        *,
        messages: int = 1,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[SpendResult]:
        messages = v.check_amount(messages, name="messages", allow_zero=False)
        return self._debit_op(account, "chat", 0, messages, "", model, idempotency_key)

    def chat_turn(
        self,
        account: str | Scope,
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
        account: str | Scope,
        op: str,
        credits: int,
        messages: int,
        feature_name: str,
        model: str | None,
        idempotency_key: str | None,
    ) -> Operation[SpendResult]:
        target = Target.of(self.keys, account)
        account = target.account
        model_name = checked_model(model)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        call = self._call(
            "debit",
            target,
            idempotency_key,
            # "|" is in no feature or model name (":" is): a:b + c differs from a + b:c.
            f"{op}:{credits}:{messages}:{feature_name}|{model_name}",
            [credits, messages, feature_name, op],
            model=model_name,
        )
        return self._run_parsed(call, target, partial(replies.spend_result, account=account))

    def grant(
        self,
        account: str | Scope,
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
        target = Target.of(self.keys, account)
        account = target.account
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
        call = self._call(
            "grant",
            target,
            idempotency_key,
            f"{credits}:{bucket.fingerprint(chat_messages)}|{reason_text}",
            [credits, chat_messages, *bucket.args(), reason_text],
        )
        return self._run_parsed(
            call, target, partial(replies.grant_change, account=account), grant_id=bucket.id
        )

    def void(
        self,
        account: str | Scope,
        grant_id: str,
        *,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Operation[Void]:
        """Takes back what is left of a grant; what was spent of it stays spent."""
        target = Target.of(self.keys, account)
        account = target.account
        grant_id = v.check_grant_id(grant_id)
        reason_text = "" if reason is None else v.check_reason(reason)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        call = self._call(
            "void",
            target,
            idempotency_key,
            f"void:{grant_id}|{reason_text}",
            [grant_id, reason_text],
        )
        parse = partial(replies.void, account=account, grant_id=grant_id)
        return self._run_parsed(call, target, parse, grant_id=grant_id)

    def correct(
        self,
        account: str | Scope,
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
        account: str | Scope,
        op: str,
        credits: int,
        chat_messages: int,
        reason: str | None,
        idempotency_key: str | None,
    ) -> Operation[BalanceChange]:
        target = Target.of(self.keys, account)
        account = target.account
        idempotency_key = v.check_idempotency_key(idempotency_key)
        if credits == 0 and chat_messages == 0:
            raise InvalidInput(f"a {op} must change credits or chat messages")
        reason_text = "" if reason is None else v.check_reason(reason)
        call = self._call(
            "adjust",
            target,
            idempotency_key,
            f"{op}:{credits}:{chat_messages}:{reason_text}",
            [credits, chat_messages, op, reason_text],
        )
        return self._run_parsed(call, target, partial(replies.balance_change, account=account))

    def set_plan(
        self, account: str | Scope, plan: str, *, idempotency_key: str | None = None
    ) -> Operation[PlanChange]:
        target = Target.of(self.keys, account)
        account = target.account
        idempotency_key = v.check_idempotency_key(idempotency_key)
        plan = self.settings.require_plan(plan)
        call = self._call("set_plan", target, idempotency_key, f"plan:{plan}", [plan])
        return self._run_parsed(
            call, target, partial(replies.plan_change, account=account, plan=plan)
        )

    def balance(self, account: str | Scope, *, model: str | None = None) -> Operation[Balance]:
        target = Target.of(self.keys, account)
        account = target.account
        model_name = checked_model(model)
        call = self._call("balance", target, None, "", [], model=model_name)
        return self._run_parsed(call, target, partial(replies.balance, account=account))

    def reserve(
        self,
        account: str | Scope,
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
        target = Target.of(self.keys, account)
        account = target.account
        amount = v.check_amount(amount, name="amount", allow_zero=False)
        messages = v.check_amount(messages, name="messages")
        model_name = checked_model(model)
        ttl_ms = self.ttl_ms(ttl)
        feature_name = "" if feature is None else v.check_feature_name(feature)
        reservation_id = v.check_reservation_id(reservation_id)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        # The reservation id is left out of the fingerprint: a retry with the
        # same idempotency key makes a new id, and must get the first one back.
        call = self._call(
            "reserve",
            target,
            idempotency_key,
            f"reserve:{amount}:{ttl_ms}:{feature_name}:{messages}:{model_name}",
            [amount, ttl_ms, reservation_id, self._retention_ms, feature_name, messages],
            [target.keys.reservation(reservation_id)],
            model=model_name,
        )
        parse = partial(replies.reservation, account=account, amount=amount, path=target.path)
        return self._run_parsed(call, target, parse, reservation_id)

    def reset_limits(
        self, account: str | Scope, name: str | None = None, *, idempotency_key: str | None = None
    ) -> Operation[int]:
        """Forgets the state of one rate limit (or all) of an account; journaled."""
        target = Target.of(self.keys, account)
        account = target.account
        limit = "" if name is None else v.check_limit_name(name)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        call = self._call("reset_limits", target, idempotency_key, f"reset_limits:{limit}", [limit])
        return self._run_parsed(call, target, replies.limit_reset)

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
        target = Target.of_reservation(self.keys, reservation, account)
        actual = 0 if release else v.check_amount(actual, name="actual")
        if type(allow_late) is not bool:
            raise InvalidInput(f"allow_late must be a bool, not {type(allow_late).__name__}")
        idempotency_key = v.check_idempotency_key(idempotency_key)
        mode = "release" if release else "settle"
        call = self._call(
            "settle",
            target,
            idempotency_key,
            f"{mode}:{reservation_id}:{actual}:{int(allow_late)}",
            [mode, actual, reservation_id, int(allow_late), self._retention_ms],
            [target.keys.reservation(reservation_id)],
        )
        parse = partial(replies.settlement, account=account, reservation_id=reservation_id)
        return self._run_parsed(call, target, parse, reservation_id)

    def extend(
        self, reservation: ReservationLike, *, ttl: int | timedelta | None = None
    ) -> Operation[Reservation]:
        """Renews the lease to now + ttl (server clock)."""
        account, reservation_id = v.check_reservation_parts(reservation)
        target = Target.of_reservation(self.keys, reservation, account)
        ttl_ms = self.ttl_ms(ttl)
        call = self._call(
            "extend",
            target,
            None,
            "",
            [ttl_ms, reservation_id, self._retention_ms],
            [target.keys.reservation(reservation_id)],
        )
        parse = partial(
            replies.reservation_extended,
            account=account,
            reservation_id=reservation_id,
            path=target.path,
        )
        return self._run_parsed(call, target, parse, reservation_id)
