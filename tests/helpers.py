"""Helpers shared by the tests (not fixtures)."""

from __future__ import annotations

from typing import Any

import redis


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under ``prefix`` with its type, value and TTL presence, for byte-for-byte compares."""
    state: dict[bytes, Any] = {}
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        kind = client.type(key)
        if kind == b"hash":
            value: Any = client.hgetall(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = client.xrange(key)
        else:
            value = client.dump(key)
        state[key] = (kind, value, client.pttl(key) > 0)
    return state


def journal_entries(client: redis.Redis, prefix: str) -> list[dict[str, str]]:
    """All journal entries under ``prefix``, decoded, in stream order per partition."""
    entries = []
    for key in client.scan_iter(match=f"{prefix}:v1:*:journal", count=1000):
        for _id, fields in client.xrange(key):
            entries.append({k.decode(): v.decode() for k, v in fields.items()})
    return entries


def account_entries(client: redis.Redis, prefix: str, account: str) -> list[dict[str, str]]:
    return sorted(
        (e for e in journal_entries(client, prefix) if e["a"] == account),
        key=lambda e: int(e["s"]),
    )
