"""Where a call lands: the account it is for, its path in a tree, and their keys.

An account named alone (a str, or a one-level ``Scope``) is a target of one
level. On a path of a tree, every level's keys carry the root's tag, and the
ancestors' keys follow the script's own (lua/_scopes.lua).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInput, NotInScope, ScopeRequired
from ..scopes import Scope
from .keys import AccountKeys, KeySpace
from .loader import AccountSnapshot

__all__ = ["Target", "check_snapshot_place"]


@dataclass(frozen=True, slots=True)
class Target:
    scope: Scope
    keys: AccountKeys
    # Each ancestor's account hash and holds, parent first.
    ancestors: tuple[str, ...]

    @classmethod
    def of(cls, space: KeySpace, account: object) -> Target:
        scope = Scope.of(account)
        keys, ancestors = space.for_path(scope.path)
        return cls(scope, keys, tuple(ancestors))

    @classmethod
    def of_reservation(cls, space: KeySpace, reservation: object, account: str) -> Target:
        """The path a reservation was made on (its ``path``), ending at its account."""
        path = getattr(reservation, "path", ())
        if not path:
            return cls.of(space, account)
        if not isinstance(path, tuple):
            raise InvalidInput(f"a reservation's path is a tuple, not {type(path).__name__}")
        scope = Scope(*path)
        if scope.account != account:
            raise InvalidInput(
                f"a reservation's path ends at its account {account!r}, not {scope.account!r}"
            )
        return cls.of(space, scope)

    @property
    def account(self) -> str:
        return self.scope.account

    @property
    def path(self) -> tuple[str, ...]:
        """The path, on a tree; () for an account alone."""
        return self.scope.path if self.scope.depth > 1 else ()

    @property
    def root(self) -> str | None:
        """The tree's root, on a path of more than one level."""
        return self.scope.root if self.scope.depth > 1 else None

    def level_keys(self, space: KeySpace, account: str) -> AccountKeys:
        return space.for_account(account, self.root)

    def place_of(self, account: str) -> tuple[str | None, str | None]:
        """The parent and root ``account`` has on this path (None, None for the root)."""
        path = self.scope.path
        depth = path.index(account)
        if depth == 0:
            return None, None
        return path[depth - 1], path[0]


def check_snapshot_place(target: Target, account: str, snapshot: AccountSnapshot) -> None:
    """Refuses to load an account whose stored place is not the one the path names."""
    parent, root = target.place_of(account)
    if (snapshot.parent, snapshot.root) == (parent, root):
        return
    if snapshot.root is not None and root is None:
        raise ScopeRequired(account=account, root=snapshot.root)
    if snapshot.root is None:
        raise NotInScope(
            f"account {account!r} is in no tree, not under {parent!r} in {root!r}'s: "
            "attach it first",
            account=target.account,
            level=account,
            parent=None,
        )
    raise NotInScope(
        f"account {account!r} is under {snapshot.parent!r} in {snapshot.root!r}'s tree, "
        f"not under {parent!r} in {root!r}'s",
        account=target.account,
        level=account,
        parent=snapshot.parent,
    )
