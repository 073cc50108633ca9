"""Moving an account to another place: under another parent, of any tree, or out
to be a root of its own (docs/scopes.md, "Moving an account").

Two partitions, so two scripts, each on one slot: ``move_out.lua`` where the
account leaves (checks, snapshot, tombstone) and ``move_in.lua`` where it
arrives; then its own partition's stub names its new root (``restub.lua``)
and its tombstone is marked done (``move_done.lua``). Every step is
idempotent by the move's id (its idempotency key), so calling ``move`` again
after a crash between two steps finishes the move.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from .. import validation as v
from ..errors import InvalidInput, MoveRefused, NotInScope, RedCreditError
from ..results import Moved
from ..scopes import MAX_DEPTH, Scope
from . import replies
from .calls import EngineBase
from .loader import AccountSnapshot
from .replies import Reply, Status
from .steps import LoadAccount, Operation, ScriptCall, Step
from .targets import Target, check_snapshot_place

__all__ = ["MoveOperations"]

# Rounds of naming the live holds of the ancestors before giving up: each
# round names every hold live then, so only new reservations need another.
_HOLD_ROUNDS = 4


class MoveOperations(EngineBase):
    def move(
        self, account: str | Scope, to: Scope | None, *, idempotency_key: str
    ) -> Operation[Moved]:
        """Moves a leaf account, with everything it holds, under the parent ``to``
        names (a path, root first), or out to be a root of its own (``None``).

        The idempotency key is the move's id: calling again with it after a
        failure finishes the move, or answers as the first call did.
        """
        account_id, dest, key = _checked(account, to, idempotency_key)
        return self._move(account_id, dest, key, finish=True)

    def move_out(
        self, account: str | Scope, to: Scope | None, *, idempotency_key: str
    ) -> Operation[Moved]:
        """The first step of :meth:`move` alone, as a crash right after it leaves a
        move: the account is a tombstone until ``move`` is called again with the key."""
        account_id, dest, key = _checked(account, to, idempotency_key)
        return self._move(account_id, dest, key, finish=False)

    def _move(
        self, account: str, dest: tuple[str, ...], key: str, *, finish: bool
    ) -> Operation[Moved]:
        old = yield from self._locate(account, key)
        if dest:
            yield from self._check_destination(Scope(*dest), account)
        old_target = Target.of(self.keys, Scope(*old))
        new_target = Target.of(self.keys, Scope(*dest, account))
        own = self.keys.for_account(account).hash
        stub_root = dest[0] if dest and old_target.keys.hash == own else ""
        out = yield from self._move_out(old_target, dest, key, stub_root)
        replayed, seq, snapshot, done, moved = (
            bool(out[1]),
            int(out[2]),
            replies.text(out[3]),
            bool(out[4]),
            bool(out[5]),
        )
        if not finish:
            return Moved(account, (*dest, account), old, moved, seq, replayed)
        if not moved and not replayed:
            return Moved(account, old, old, moved=False, sequence=seq)
        sequence = seq
        if not moved:
            # This move brought it here already; its last steps are run again.
            old_target = new_target
        elif done:
            sequence = seq + 1
        else:
            sequence = yield from self._move_in(
                old_target, new_target, key, snapshot, seq, old, replayed
            )
        # The tombstone is marked done before the stub moves on: until the stub
        # names the new root, a retry finds the tombstone, and so its way here.
        if old_target.keys.hash != new_target.keys.hash:
            yield self._standalone("move_done", old_target.keys.hash, key)
        if new_target.keys.hash != own and dest:
            yield self._standalone("restub", own, dest[0])
        return Moved(account, (*dest, account), old, True, sequence, replayed)

    def _standalone(self, script: str, key: str, arg: str) -> ScriptCall:
        return ScriptCall(self.scripts[script], [key], [arg], self._wait)

    # -- the steps ---------------------------------------------------------------

    def _locate(self, account: str, key: str) -> Generator[Step, Any, tuple[str, ...]]:
        """The account's path now, root first, read from Redis (PostgreSQL for a level
        evicted from it); a half-done move's tombstone gives the path it left."""
        own: Reply = yield self._standalone("locate", self.keys.for_account(account).hash, "")
        credits, _parent, root, move_id, done, _dest, left = map(_opt, own)
        if move_id is not None and done is None and left is not None:
            return tuple(left.split("\n"))
        if root is None:
            if credits is None and move_id is None:
                snapshot: AccountSnapshot = yield LoadAccount(account)
                if snapshot.root is None:
                    if snapshot.sequence == 0 and not snapshot.buckets:
                        raise _refused(account, "not_found", "it is neither in Redis nor stored")
                    return (account,)
                root = snapshot.root
            else:
                return (account,)
        path = [account]
        for _ in range(MAX_DEPTH):
            level = path[-1]
            found: Reply = yield self._standalone(
                "locate", self.keys.for_account(level, root).hash, ""
            )
            credits, parent, _root, move_id, done, dest, left = map(_opt, found)
            if move_id is not None and credits is None:
                if level == account and done is None and left is not None:
                    return tuple(left.split("\n"))
                if level == account and move_id == key:
                    # This move, done but for the stub: the account is where it went.
                    return (*filter(None, (dest or "").split("\n")), account)
                raise replies.moved(account, level, dest or "")
            if credits is None:
                snapshot = yield LoadAccount(level)
                parent = snapshot.parent
            if parent is None:
                return tuple(reversed(path))
            path.append(parent)
        raise NotInScope(
            f"account {account!r}'s tree is deeper than {MAX_DEPTH} levels",
            account=account,
            parent=None,
        )

    def _check_destination(self, to: Scope, account: str) -> Generator[Step, Any, None]:
        """The new parent's path is the stored tree, and each level exists; nothing is
        written but the hydration of a level PostgreSQL holds."""
        target = Target.of(self.keys, to)
        call = self._call("balance", target, None, "", [])
        while True:
            reply: Reply = yield call
            if reply[0] != Status.MISSING:
                break
            level = replies.text(reply[2])
            snapshot: AccountSnapshot = yield LoadAccount(level)
            if snapshot.sequence == 0 and not snapshot.buckets and snapshot.root is None:
                raise _refused(
                    account, "target", f"the new parent's level {level!r} does not exist"
                )
            check_snapshot_place(target, level, snapshot)
            hydrated: Reply = yield self._hydrate(target.level_keys(self.keys, level), snapshot)
            if hydrated[0] == Status.MOVED:
                raise replies.moved(account, level, replies.text(hydrated[3]))
        refused = replies.refusal(reply, to.account)
        if refused is not None:
            raise refused

    def _move_out(
        self, old: Target, dest: tuple[str, ...], key: str, stub_root: str
    ) -> Generator[Step, Any, Reply]:
        account = old.account
        records: list[str] = []
        for _ in range(_HOLD_ROUNDS):
            named = list(records)

            def call(counts: str, named: list[str] = named) -> ScriptCall:
                return self._call(
                    "move_out",
                    old,
                    key,
                    "move",
                    [len(named), "\n".join(named), "\n".join(dest), stub_root, counts],
                    extra_keys=[old.keys.reservation(rid) for rid in named],
                )

            reply = yield from self._run_counted(call, old, partial_uncounted(account))
            if reply[0] != Status.HOLDS_UNKNOWN:
                break
            records += [replies.text(rid) for rid in reply[2:]]
        else:
            raise _refused(account, "holds", "reservations kept being made through its path")
        if reply[0] != Status.OK:
            raise _move_refusal(reply, account)
        return reply

    def _move_in(
        self,
        old: Target,
        new: Target,
        key: str,
        snapshot: str,
        out_seq: int,
        old_path: tuple[str, ...],
        replayed: bool,
    ) -> Generator[Step, Any, int]:
        account = new.account
        stored = 0
        if replayed:
            # A retry: the account may have arrived, and been evicted since.
            loaded: AccountSnapshot = yield LoadAccount(account)
            stored = loaded.sequence
        leaving = old_path[0] if len(old_path) > 1 else ""

        def call(where: Target, counts: str) -> ScriptCall:
            return self._call(
                "move_in", where, key, "move", [snapshot, out_seq, leaving, stored, counts]
            )

        uncounted = partial_uncounted(account)
        reply = yield from self._run_counted(lambda c: call(new, c), new, uncounted)
        if reply[0] == Status.OK:
            return int(reply[2])
        # The destination changed since it was checked: back to where it was
        # (a move_in at the old place, from the same snapshot), then refused.
        yield from self._run_counted(lambda c: call(old, c), old, uncounted)
        raise _move_refusal(reply, account)


def partial_uncounted(account: str) -> Callable[[str], Exception]:
    def refusal(level: str) -> MoveRefused:
        return _refused(
            account,
            "uncounted",
            f"PostgreSQL keeps no count of {level!r}'s children: run redcredit migrate",
        )

    return refusal


def _checked(
    account: str | Scope, to: Scope | None, idempotency_key: str
) -> tuple[str, tuple[str, ...], str]:
    """A move's arguments, checked before any I/O: the account, the new parent's
    path (() for none) and the move's id."""
    account_id = Scope.of(account).account
    if to is not None and not isinstance(to, Scope):
        raise InvalidInput(f"to must be a Scope or None, not {type(to).__name__}")
    key = v.check_idempotency_key(idempotency_key)
    if key is None:
        raise InvalidInput("a move takes an idempotency_key: calling again with it finishes it")
    if to is None:
        return account_id, (), key
    if account_id in to.path:
        raise _refused(account_id, "cycle", f"{'/'.join(to.path)} is in its own subtree")
    if to.depth + 1 > MAX_DEPTH:
        raise _refused(
            account_id, "depth", f"under {'/'.join(to.path)} it would pass {MAX_DEPTH} levels"
        )
    return account_id, to.path, key


def _move_refusal(reply: Reply, account: str) -> RedCreditError:
    refused = replies.refusal(reply, account)
    return refused or RedCreditError(f"unexpected reply from Redis: {reply!r}")


_refused = replies.move_refused


def _opt(value: bytes | str | None) -> str | None:
    return None if value is None else replies.text(value)
