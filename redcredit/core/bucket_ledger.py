"""An account's credit buckets as its journal leaves them, without I/O.

The syncer folds each new ledger entry into PostgreSQL's ``buckets`` rows
with :func:`fold_entry`, and ``reconcile`` folds the journal not applied yet
into them to know what Redis must hold. The base bucket has no row: it is the
rest of the account's credits (see ``migrations/0004_buckets.sql``).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from .journal import BASE_BUCKET, BucketChange, JournalEntry
from .loader import BucketSnapshot

__all__ = ["BucketRow", "fold_entry", "open_snapshots", "unpack_buckets"]


@dataclass(slots=True)
class BucketRow:
    """One bucket besides the base bucket; times in ms on the server's clock, 0 never."""

    category: str
    priority: int
    effective_ms: int
    expires_ms: int
    granted: int
    created_ms: int
    remaining: int
    live: bool
    last_seq: int

    @property
    def status(self) -> str:
        # Redis drops a bucket once nothing is left of it.
        if self.remaining == 0:
            return "closed"
        return "live" if self.live else "pending"

    def snapshot(self, bucket: str) -> BucketSnapshot:
        return BucketSnapshot(
            id=bucket,
            category=self.category,
            priority=self.priority,
            remaining=self.remaining,
            granted=self.granted,
            effective_ms=self.effective_ms,
            expires_ms=self.expires_ms,
            created_ms=self.created_ms,
            pending=not self.live,
        )

    @classmethod
    def of(cls, snapshot: BucketSnapshot, last_seq: int) -> BucketRow:
        return cls(
            category=snapshot.category,
            priority=snapshot.priority,
            effective_ms=snapshot.effective_ms,
            expires_ms=snapshot.expires_ms,
            granted=snapshot.granted,
            created_ms=snapshot.created_ms,
            remaining=snapshot.remaining,
            live=not snapshot.pending,
            last_seq=last_seq,
        )


def fold_entry(
    rows: dict[str, BucketRow], entry: JournalEntry, touched: set[str] | None = None
) -> tuple[BucketChange, ...] | None:
    """Applies one entry of an account to its bucket rows (by id), in sequence order.

    Adds the ids of the rows it changed to ``touched``. For a re-base, whose
    entry carries Redis's buckets after it, returns the changes that take the
    rows there, so the ledger's per-bucket deltas keep summing to the
    remaining credits; otherwise None.
    """
    changed = touched if touched is not None else set()
    seq = entry.seq
    grant = entry.grant
    if entry.bucket and grant is not None:
        # A grant opens its bucket (a closed one's id may be granted again); a
        # refill sets the refill bucket's attributes for its new period.
        row = rows.get(entry.bucket)
        remaining = 0 if row is None else row.remaining
        rows[entry.bucket] = BucketRow(
            category=grant.category,
            priority=grant.priority,
            effective_ms=grant.effective_ms,
            expires_ms=grant.expires_ms,
            granted=grant.granted,
            created_ms=grant.created_ms,
            remaining=remaining,
            live=entry.op == "refill" or grant.effective_ms <= entry.server_time_ms,
            last_seq=seq,
        )
        changed.add(entry.bucket)
    for change in entry.bucket_changes:
        row = rows.get(change.bucket)
        # A bucket the system of record never saw granted cannot be made up:
        # reconcile reports it.
        if change.bucket != BASE_BUCKET and row is not None:
            row.remaining = change.after
            row.last_seq = seq
            changed.add(change.bucket)
    row = rows.get(entry.bucket) if entry.bucket else None
    if entry.bucket and row is not None:
        if entry.op == "effective":
            row.live = True
        elif entry.op == "void" or (entry.op == "expire" and entry.feature != "rollover"):
            # Closed as the op says, whatever its changes read.
            row.remaining = 0
        row.last_seq = seq
        changed.add(entry.bucket)
    if entry.bucket_snapshot is None:
        return None
    return _rebased(rows, entry, entry.bucket_snapshot, changed)


def _rebased(
    rows: dict[str, BucketRow],
    entry: JournalEntry,
    snapshots: tuple[BucketSnapshot, ...],
    changed: set[str],
) -> tuple[BucketChange, ...]:
    changes = [c for c in entry.bucket_changes if c.bucket == BASE_BUCKET]
    wanted = {b.id: b for b in snapshots}
    for bucket, row in rows.items():
        if bucket not in wanted and row.remaining != 0:
            changes.append(BucketChange(bucket, -row.remaining, 0))
            row.remaining = 0
            row.last_seq = entry.seq
            changed.add(bucket)
    for bucket, snapshot in wanted.items():
        before = rows.get(bucket)
        had = 0 if before is None else before.remaining
        if before is None or snapshot.remaining != had:
            changes.append(BucketChange(bucket, snapshot.remaining - had, snapshot.remaining))
        rows[bucket] = BucketRow.of(snapshot, entry.seq)
        changed.add(bucket)
    return tuple(changes)


def open_snapshots(rows: dict[str, BucketRow]) -> dict[str, BucketSnapshot]:
    """The buckets Redis holds for these rows: every one not closed."""
    return {bucket: row.snapshot(bucket) for bucket, row in rows.items() if row.status != "closed"}


def unpack_buckets(packed: bytes | None) -> dict[str, BucketSnapshot]:
    """The buckets of an account hash's field B (see lua/_buckets.lua), base bucket left out.

    Without the field the account has its base bucket only. A bucket with
    nothing left, kept while a hold still names it, is left out too: the
    system of record closes it.
    """
    if not packed:
        return {}
    found = {}
    for raw in msgpack.unpackb(packed, raw=False):
        # {id, remaining, held, priority, category, effective, expires, created, granted, live}
        bucket, remaining, _held, priority, category, effective, expires, created, granted, live = (
            raw
        )
        if bucket == BASE_BUCKET or remaining == 0:
            continue
        found[bucket] = BucketSnapshot(
            id=bucket,
            category=category,
            priority=int(priority),
            remaining=int(remaining),
            granted=int(granted),
            effective_ms=int(effective),
            expires_ms=int(expires),
            created_ms=int(created),
            pending=int(live) == 0,
        )
    return found
