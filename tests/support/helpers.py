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
    for key in client.scan_iter(match=f"{prefix}:v1:*:journal", count=1000, _type="stream"):
        for _id, fields in client.xrange(key):
            entries.append({k.decode(): v.decode() for k, v in fields.items()})
    return entries


def account_entries(client: redis.Redis, prefix: str, account: str) -> list[dict[str, str]]:
    return sorted(
        (e for e in journal_entries(client, prefix) if e["a"] == account),
        key=lambda e: int(e["s"]),
    )


def persisted_state(conn: Any, schema: str) -> dict[str, dict[str, int]]:
    """Per account: the account row and the sums of its ledger, from PostgreSQL."""
    rows = conn.execute(
        f"SELECT a.account, COALESCE(a.credits, 0), COALESCE(a.chat_messages, 0), a.last_seq, "
        f"COALESCE(SUM(l.credit_delta), 0), COALESCE(SUM(l.chat_delta), 0), COUNT(l.seq), "
        f"COALESCE(MIN(l.seq), 0), COALESCE(MAX(l.seq), 0) "
        f'FROM "{schema}".accounts a LEFT JOIN "{schema}".ledger l USING (account) '
        f"GROUP BY a.account, a.credits, a.chat_messages, a.last_seq"
    ).fetchall()
    keys = (
        "credits",
        "chat",
        "last_seq",
        "ledger_credits",
        "ledger_chat",
        "entries",
        "first",
        "last",
    )
    return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}


def assert_persisted_exactly(client: redis.Redis, settings: Any, conn: Any) -> int:
    """Invariants 2, 3 and 6 after a drain: PostgreSQL equals Redis, ledgers sum and have no gap.

    Returns the number of accounts checked.
    """
    from redcredit.core.keys import KeySpace

    space = KeySpace(settings.versioned_prefix, settings.partitions)
    state = persisted_state(conn, settings.pg_schema)
    for stream in space.journals():
        assert client.xlen(stream) == 0, f"{stream} still holds entries"
    for account, row in state.items():
        c, m, s = client.hmget(space.for_account(account).hash, "c", "m", "s")
        assert c is not None, f"{account} missing from Redis"
        assert (row["credits"], row["chat"]) == (int(c), int(m)), account
        assert row["last_seq"] == int(s), account
        assert (row["ledger_credits"], row["ledger_chat"]) == (row["credits"], row["chat"]), account
        assert row["first"] == 1 and row["entries"] == row["last"] == row["last_seq"], account
    in_redis = {
        space.account_from_key(key) for key in client.scan_iter(match=space.account_pattern())
    }
    assert in_redis <= set(state), f"never persisted: {sorted(in_redis - set(state))[:5]}"
    return len(state)


async def mixed_load(arc: Any, accounts: list[str], operations: int, seed: int) -> int:
    """Spends, chat turns, grants, plan changes and reservations, 64 at a time.

    Refusals are part of the load. Returns the number of operations that succeeded.
    """
    import asyncio
    import random

    from redcredit import RedCreditError

    rng = random.Random(seed)

    async def one(i: int) -> bool:
        account = rng.choice(accounts)
        kind = rng.random()
        try:
            if kind < 0.45:
                await arc.spend(account, cost=rng.randint(0, 5))
            elif kind < 0.65:
                await arc.chat_turn(account, cost=rng.randint(1, 3))
            elif kind < 0.75:
                await arc.grant(account, rng.randint(1, 20), idempotency_key=f"pay-{seed}-{i % 50}")
            elif kind < 0.78:
                await arc.set_plan(account, rng.choice(["free", "paid"]))
            else:
                reservation = await arc.reserve(account, rng.randint(1, 10), ttl=30)
                if rng.random() < 0.7:
                    await arc.settle(reservation, rng.randint(0, 12))
                else:
                    await arc.release(reservation)
        except RedCreditError:
            return False
        return True

    done = 0
    for start in range(0, operations, 64):
        results = await asyncio.gather(*(one(i) for i in range(start, min(start + 64, operations))))
        done += sum(results)
    return done
