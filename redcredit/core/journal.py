"""Journal entries as read from the partition streams (format: docs/journal.md)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["LEDGER_COLUMNS", "JournalEntry", "parse_entry", "text"]

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
)


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

    @property
    def identity(self) -> tuple[str, str]:
        # Stream ids are unique within one stream only: partitions share them.
        return (self.stream, self.stream_id)

    @property
    def position(self) -> tuple[str, int]:
        """Where the entry lands in the ledger: its account and sequence number."""
        return (self.account, self.seq)

    def ledger_row(self) -> tuple[Any, ...]:
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
        )


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional_int(fields: dict[str, str], name: str) -> int | None:
    value = fields.get(name)
    return None if value is None else int(value)


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
    )
