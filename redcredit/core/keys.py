"""Key layout: every key of an account carries its partition's hash tag.

An account's partition is a stable hash of its id into a fixed number of
partitions. All keys of the account, and the journal stream of its partition,
share the tag ``{<partition>}``, so every script touches a single Cluster slot
while partitions spread over the cluster's nodes.

Layout, with ``rc:v1`` the prefix and its schema version::

    rc:v1:{17}:a:<account>                 account hash
    rc:v1:{17}:h:<account>                 holds (sorted set of deadlines)
    rc:v1:{17}:r:<account>:<reservation>   reservation record (32 hex chars)
    rc:v1:{17}:i:<len>:<account>:<key>     idempotency record
    rc:v1:{17}:journal                     the partition's journal stream
    rc:v1:{17}:sync:<group>                which syncer of the group reads it
    rc:v1:{sync}:members:<group>           the group's live syncers

The keys of a tree's member carry the tag of the tree's root (its
partition), so a call on any path of the tree touches one slot; the member's
own partition keeps a stub of its account hash naming the root.

The account id is the last part of the first three keys, after a one-letter
kind, and the reservation id has a fixed length, so no id can be read as
another key. The idempotency key is preceded by the byte length of the account
id for the same reason. The tag is the first ``{...}`` of every key, and the
prefix may not contain braces, so braces in an id cannot move the tag.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

__all__ = ["AccountKeys", "KeySpace"]


@dataclass(frozen=True, slots=True)
class AccountKeys:
    account: str
    hash: str
    holds: str
    journal: str
    # Prefix of the idempotency and reservation keys, completed per call.
    _idem_base: str
    _reservation_base: str

    def idempotency(self, key: str | None) -> str:
        # Scripts always get four keys; without an idempotency key the fourth is
        # a name in the same slot that is never read.
        return self._idem_base + (key or "")

    def reservation(self, reservation_id: str) -> str:
        return self._reservation_base + reservation_id

    def common(self, idempotency_key: str | None) -> list[str]:
        return [self.hash, self.holds, self.journal, self.idempotency(idempotency_key)]


class KeySpace:
    """Builds key names for one deployment (prefix, schema version, partitions)."""

    __slots__ = ("partitions", "prefix")

    def __init__(self, versioned_prefix: str, partitions: int) -> None:
        self.prefix = versioned_prefix
        self.partitions = partitions

    def partition(self, account: str) -> int:
        return zlib.crc32(account.encode()) % self.partitions

    def tag(self, partition: int) -> str:
        return f"{self.prefix}:{{{partition}}}"

    def journal(self, partition: int) -> str:
        return f"{self.tag(partition)}:journal"

    def journals(self) -> list[str]:
        return [self.journal(p) for p in range(self.partitions)]

    def sync_lease(self, partition: int, group: str) -> str:
        return f"{self.tag(partition)}:sync:{group}"

    def sync_members(self, group: str) -> str:
        # Not a partition's tag: the set spans all of them, and is touched alone.
        return f"{self.prefix}:{{sync}}:members:{group}"

    def account_pattern(self) -> str:
        """SCAN pattern matching every account hash of this deployment."""
        return f"{self.prefix}:{{*}}:a:*"

    def account_from_key(self, key: bytes | str) -> str:
        name = key.decode() if isinstance(key, bytes) else key
        # The tag holds only digits, so the first "}:a:" ends it.
        return name[name.index("}:a:", len(self.prefix)) + 4 :]

    def for_account(self, account: str, root: str | None = None) -> AccountKeys:
        """The keys of an account; a tree's member's carry its root's tag."""
        tag = self.tag(self.partition(account if root is None else root))
        return AccountKeys(
            account=account,
            hash=f"{tag}:a:{account}",
            holds=f"{tag}:h:{account}",
            journal=f"{tag}:journal",
            _idem_base=f"{tag}:i:{len(account.encode())}:{account}:",
            _reservation_base=f"{tag}:r:{account}:",
        )

    def for_path(self, path: tuple[str, ...]) -> tuple[AccountKeys, list[str]]:
        """The keys of a path's last account, and each ancestor's hash and
        holds, parent first, all with the root's tag."""
        root = path[0]
        leaf = self.for_account(path[-1], root)
        ancestors: list[str] = []
        for account in reversed(path[:-1]):
            keys = self.for_account(account, root)
            ancestors += [keys.hash, keys.holds]
        return leaf, ancestors
