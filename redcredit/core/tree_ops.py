"""The operations on trees of accounts: attaching an account, and caps.

A tree's calls themselves (spend, reserve, ...) are the engine's usual
operations, given a :class:`~redcredit.scopes.Scope` instead of an account id.
"""

from __future__ import annotations

from functools import partial

from .. import validation as v
from ..errors import InvalidInput, NotInScope, ScopeRequired
from ..results import Attached, CapChange
from ..scopes import Cap, Scope
from . import replies
from .calls import EngineBase
from .loader import AccountSnapshot
from .replies import Reply, Status
from .steps import LoadAccount, Operation, ScriptCall
from .targets import Target

__all__ = ["TreeOperations"]


class TreeOperations(EngineBase):
    def attach(self, scope: Scope, *, idempotency_key: str | None = None) -> Operation[Attached]:
        """Adds ``scope.account``, a new account, to the tree under ``scope.parent``.

        Its own partition is marked first (``join.lua``), so that the account
        can no longer be opened alone; then it is created in the root's
        partition, on the default plan and with no credits or chat messages of
        its own (not the free tier's): its ancestors pay for it until it is
        granted some. Attaching again is harmless.
        """
        if not isinstance(scope, Scope) or scope.depth < 2:
            raise InvalidInput(
                "attach takes the Scope of the account, its parent and root included"
            )
        idempotency_key = v.check_idempotency_key(idempotency_key)
        return self._attach(Target.of(self.keys, scope), idempotency_key)

    def _attach(self, target: Target, idempotency_key: str | None) -> Operation[Attached]:
        scope, account = target.scope, target.account
        snapshot: AccountSnapshot = yield LoadAccount(account)
        placed = (snapshot.parent, snapshot.root) == (scope.parent, scope.root)
        if placed:
            # The system of record has it in this tree: Redis only lacks it.
            yield self._hydrate(target.keys, snapshot)
            return Attached(account, scope.path, attached=False, sequence=snapshot.sequence)
        if snapshot.root is not None:
            raise NotInScope(
                f"account {account!r} is under {snapshot.parent!r} in {snapshot.root!r}'s tree",
                account=account,
                parent=snapshot.parent,
            )
        if snapshot.sequence or snapshot.buckets:
            raise replies.has_history(account)
        joined: Reply = yield ScriptCall(
            self.scripts["join"], [self.keys.for_account(account).hash], [scope.root], self._wait
        )
        if joined[0] == Status.IN_TREE:
            raise ScopeRequired(account=account, root=replies.text(joined[2]))
        if joined[0] == Status.HAS_HISTORY:
            raise replies.has_history(account)
        plan = v.check_plan_name(snapshot.plan)

        def call(counts: str) -> ScriptCall:
            # A member opens empty, whatever the free tier: its ancestors pay for
            # it until it is granted credits of its own.
            return self._call(
                "attach",
                target,
                idempotency_key,
                f"attach:{'/'.join(scope.path)}",
                [0, 0, plan, counts],
            )

        reply = yield from self._run_counted(call, target)
        refused = replies.refusal(reply, account)
        if refused is not None:
            raise refused
        return _attached(reply, account=account, path=scope.path)

    def set_cap(
        self,
        account: str | Scope,
        cap: Cap | None,
        *,
        idempotency_key: str | None = None,
    ) -> Operation[CapChange]:
        """Sets the cap of a level (``None`` removes it); the current window's use is kept."""
        if cap is not None and not isinstance(cap, Cap):
            raise InvalidInput(f"cap must be a Cap or None, not {type(cap).__name__}")
        target = Target.of(self.keys, account)
        idempotency_key = v.check_idempotency_key(idempotency_key)
        text = "" if cap is None else cap.text()
        call = self._call("set_cap", target, idempotency_key, f"cap:{text}", [text])
        parse = partial(_cap_change, account=target.account, cap=cap)
        return self._run_parsed(call, target, parse)


def _attached(reply: Reply, *, account: str, path: tuple[str, ...]) -> Attached:
    return Attached(account, path, attached=bool(reply[2]), sequence=int(reply[3]))


def _cap_change(reply: Reply, *, account: str, cap: Cap | None) -> CapChange:
    return CapChange(account, cap, sequence=int(reply[2]), replayed=bool(reply[1]))
