"""What an account costs in Redis memory, idle and with an active hold, and a journal entry."""

from __future__ import annotations

import asyncio

import redis

from redcredit import AsyncRedCredit
from redcredit.core.engine import Engine

from ..harness import Config, Results, Servers, rc_settings, trim_journals


def run(cfg: Config, servers: Servers, res: Results) -> None:
    url = servers.redis_url
    settings = rc_settings(url, free_credits=100, free_chat_messages=20)
    engine = Engine(settings)

    async def go() -> tuple[str, str]:
        async with AsyncRedCredit(settings=settings) as rc:
            await rc.spend("idle-account", cost=1)
            await rc.spend("held-account", cost=1)
            held = await rc.reserve("held-account", 10, ttl=600)
            for i in range(1000):
                await rc.grant(f"j{i}", 1)
            return held.id, held.account

    reservation_id, account = asyncio.run(go())
    with redis.Redis.from_url(url) as conn:

        def usage(key: str) -> int:
            return int(conn.memory_usage(key, samples=0) or 0)

        idle = engine.keys.for_account("idle-account")
        keys = engine.keys.for_account(account)
        res.memory["idle_account_bytes"] = usage(idle.hash)
        res.memory["held_account_hash_bytes"] = usage(keys.hash)
        res.memory["held_holds_set_bytes"] = usage(keys.holds)
        res.memory["held_reservation_record_bytes"] = usage(keys.reservation(reservation_id))
        res.memory["held_account_total_bytes"] = (
            res.memory["held_account_hash_bytes"]
            + res.memory["held_holds_set_bytes"]
            + res.memory["held_reservation_record_bytes"]
        )
        entries = used = 0
        for journal in engine.keys.journals():
            entries += int(conn.xlen(journal))
            used += usage(journal)
        res.memory["journal_bytes_per_entry"] = used / max(entries, 1)
    print(f"  memory: {res.memory}")
    trim_journals(settings)
