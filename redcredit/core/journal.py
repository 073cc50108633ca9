"""Journal entries as read from the partition streams (format: docs/journal.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from .loader import BucketSnapshot

__all__ = [
    "BASE_BUCKET",
    "LEDGER_COLUMNS",
    "BucketChange",
    "GrantAttributes",
    "JournalEntry",
    "changes_json",
    "instant",
    "parse_entry",
    "text",
]

# The bucket that holds the rest of an account's credits; the system of record
# keeps no row for it (see migrations/0004_buckets.sql).
BASE_BUCKET = "base"

# Column order of the ledger table, as written by the syncer.
LEDGER_COLUMNS = (
    "account",
    "seq",
    "op",
    "credit_delta",
    "chat_delta",
    "credits_after",
    "chat_after",
    "plan",
    "credits_used",
    "chat_used",
    "feature",
    "idempotency_key",
    "reservation_id",
    "hold_amount",
    "server_time",
    "stream_id",
    "bucket",
    "bucket_changes",
    "grant_category",
    "grant_priority",
    "grant_effective_at",
    "grant_expires_at",
    "grant_amount",
    "grant_created_at",
    "level",
    "via",
    "parent",
    "root",
    "cap",
    "cap_window",
    "cap_credits",
    "cap_messages",
    "children",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def instant(ms: int) -> datetime:
    """ms since the epoch as a datetime, exactly (a float division may round)."""
    return _EPOCH + timedelta(milliseconds=ms)


class BucketChange(NamedTuple):
    """What one entry did to one bucket: its delta, and its remaining credits after."""

    bucket: str
    delta: int
    after: int


@dataclass(frozen=True, slots=True)
class GrantAttributes:
    """A bucket's attributes as a grant or refill entry leaves them; times in ms, 0 never."""

    category: str
    priority: int
    effective_ms: int
    expires_ms: int
    granted: int
    created_ms: int


def changes_json(changes: tuple[BucketChange, ...]) -> str | None:
    """The ledger's ``bucket_changes``: a JSON array, None when no bucket changed."""
    if not changes:
        return None
    return json.dumps([{"bucket": c.bucket, "delta": c.delta, "after": c.after} for c in changes])


@dataclass(frozen=True, slots=True)
class JournalEntry:
    stream: str
    stream_id: str
    account: str
    seq: int
    op: str
    credit_delta: int
    chat_delta: int
    credits_after: int
    chat_after: int
    plan: str
    server_time_ms: int
    credits_used: int | None = None
    chat_used: int | None = None
    feature: str | None = None
    idempotency_key: str | None = None
    reservation_id: str | None = None
    hold_amount: int | None = None
    # The bucket the op is about (grant, void, expire, effective, refill).
    bucket: str | None = None
    bucket_changes: tuple[BucketChange, ...] = ()
    # Grant and refill entries: the bucket's attributes after the entry.
    grant: GrantAttributes | None = None
    # A re-base: every bucket of the account besides the base bucket, as Redis
    # has them after it (their changes on the fork were kept apart).
    bucket_snapshot: tuple[BucketSnapshot, ...] | None = None
    # On a path of a tree: the account's depth (1 the root) and, on an
    # ancestor's entry, the account the call was for.
    level: int | None = None
    via: str | None = None
    # 'attach': where the account was placed; 'cap': the cap set ('' removed).
    parent: str | None = None
    root: str | None = None
    cap: str | None = None
    # A capped level: its window's start and what was charged through it then.
    cap_use: tuple[int, int, int] | None = None
    # 'child': how many children the account has after the entry.
    children: int | None = None

    @property
    def identity(self) -> tuple[str, str]:
        # Stream ids are unique within one stream only: partitions share them.
        return (self.stream, self.stream_id)

    @property
    def position(self) -> tuple[str, int]:
        """Where the entry lands in the ledger: its account and sequence number."""
        return (self.account, self.seq)

    @property
    def touches_buckets(self) -> bool:
        return bool(self.bucket or self.bucket_changes) or self.bucket_snapshot is not None

    @property
    def touches_tree(self) -> bool:
        """Places the account in a tree, sets its cap, changes the cap's use or counts
        its children."""
        return (
            self.places
            or self.cap is not None
            or self.cap_use is not None
            or self.children is not None
        )

    @property
    def places(self) -> bool:
        """Puts the account where ``parent`` and ``root`` say (None: a root of its own)."""
        return self.op in ("attach", "move_in")

    def ledger_row(self) -> tuple[Any, ...]:
        grant = self.grant
        return (
            self.account,
            self.seq,
            self.op,
            self.credit_delta,
            self.chat_delta,
            self.credits_after,
            self.chat_after,
            self.plan,
            self.credits_used,
            self.chat_used,
            self.feature,
            self.idempotency_key,
            self.reservation_id,
            self.hold_amount,
            datetime.fromtimestamp(self.server_time_ms / 1000, tz=UTC),
            self.stream_id,
            self.bucket,
            changes_json(self.bucket_changes),
            None if grant is None else grant.category,
            None if grant is None else grant.priority,
            None if grant is None else instant(grant.effective_ms),
            None if grant is None or grant.expires_ms == 0 else instant(grant.expires_ms),
            None if grant is None else grant.granted,
            None if grant is None else instant(grant.created_ms),
            self.level,
            self.via,
            self.parent,
            self.root,
            self.cap,
            *(self.cap_use or (None, None, None)),
            self.children,
        )


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional_int(fields: dict[str, str], name: str) -> int | None:
    value = fields.get(name)
    return None if value is None else int(value)


def _bucket_changes(value: str | None) -> tuple[BucketChange, ...]:
    if not value:
        return ()
    changes = []
    for part in value.split(","):
        # A grant id may hold ':', never ','.
        bucket, delta, after = part.rsplit(":", 2)
        changes.append(BucketChange(bucket, int(delta), int(after)))
    return tuple(changes)


def _grant(fields: dict[str, str]) -> GrantAttributes | None:
    if "gc" not in fields:
        return None
    return GrantAttributes(
        category=fields["gc"],
        priority=int(fields["gp"]),
        effective_ms=int(fields["ge"]),
        expires_ms=int(fields["gx"]),
        granted=int(fields["ga"]),
        created_ms=int(fields["gt"]),
    )


def _snapshot(value: str | None) -> tuple[BucketSnapshot, ...] | None:
    """Buckets in hydrate.lua's format: 'id,category,priority,remaining,granted,effective,
    expires,created,live' joined by ';'."""
    if value is None:
        return None
    buckets = []
    for text_ in filter(None, value.split(";")):
        f = text_.split(",")
        buckets.append(
            BucketSnapshot(
                id=f[0],
                category=f[1],
                priority=int(f[2]),
                remaining=int(f[3]),
                granted=int(f[4]),
                effective_ms=int(f[5]),
                expires_ms=int(f[6]),
                created_ms=int(f[7]),
                pending=f[8] == "0",
            )
        )
    return tuple(buckets)


def parse_entry(stream: Any, stream_id: Any, raw: Any) -> JournalEntry:
    """An entry from a stream reply (bytes or str, as the client decodes)."""
    fields = {text(k): text(v) for k, v in raw.items()}
    return JournalEntry(
        stream=text(stream),
        stream_id=text(stream_id),
        account=fields["a"],
        seq=int(fields["s"]),
        op=fields["op"],
        credit_delta=int(fields["dc"]),
        chat_delta=int(fields["dm"]),
        credits_after=int(fields["c"]),
        chat_after=int(fields["m"]),
        plan=fields["p"],
        server_time_ms=int(fields["t"]),
        credits_used=_optional_int(fields, "uc"),
        chat_used=_optional_int(fields, "um"),
        feature=fields.get("f"),
        idempotency_key=fields.get("k"),
        reservation_id=fields.get("r"),
        hold_amount=_optional_int(fields, "x"),
        bucket=fields.get("g"),
        bucket_changes=_bucket_changes(fields.get("bk")),
        grant=_grant(fields),
        bucket_snapshot=_snapshot(fields.get("bs")),
        level=_optional_int(fields, "lv"),
        via=fields.get("v"),
        # '' in a move's entry: no parent, no root.
        parent=fields.get("pa") or None,
        root=fields.get("ro") or None,
        cap=fields.get("K"),
        cap_use=(
            (int(fields["kw"]), int(fields["kc"]), int(fields["km"])) if "kw" in fields else None
        ),
        children=_optional_int(fields, "Z"),
    )
