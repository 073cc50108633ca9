"""A fork of a tree's level: which of its entries repeat a call PostgreSQL's side holds, and
the cap's use it re-bases onto.

A call on a path journals one entry per level that pays or counts it; only
the call's own account's carries the idempotency key, and an ancestor's
names that account (``via``). A script runs alone, and the call's own entry
comes first, so the entry of ``via`` at the same server time just before
an ancestor's in the tree's stream (every level's entries are in the root's
partition) is the call's. An ancestor's entry repeats PostgreSQL's side when that call does:
the ledger of ``via`` holds the key under another entry.

A cap's use is re-based like the balances: PostgreSQL's use in the window
current at the fork's end, plus what the fork counted in it, less what its
repeated calls counted.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import psycopg

from ..backends.postgres import applied_calls, diverged_calls

__all__ = ["ON_THE_WAY", "CapUse", "cap_target", "repeated_via", "stream_order"]

CapUse = tuple[int, int, int]  # the window's start, credits and chat messages counted in it

# Entries a call writes on its way (the opening, lapses, refills) carry its
# idempotency key but are not its effect.
ON_THE_WAY = ("lapse", "refill", "open")


def stream_order(stream_id: str) -> tuple[int, int]:
    """A stream id as a pair that sorts as the stream does (text puts "10-2" before "9-3")."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def repeated_via(
    conn: psycopg.Connection[Any], schema: str, entries: Sequence[tuple[Any, ...]]
) -> set[str]:
    """Stream ids of a fork's ancestor entries (``fork_entries`` rows) whose call repeats
    one PostgreSQL's side holds."""
    ancestors = [e for e in entries if e[8] is not None]
    if not ancestors:
        return set()
    # The calls' own entries, on the fork too or in the ledger if theirs did not fork:
    # journaled by the same script, so at the same server time.
    vias = sorted({e[8] for e in ancestors})
    times = sorted({e[12] for e in ancestors})
    kept: dict[tuple[str, Any], list[tuple[tuple[int, int], str, str | None]]] = {}
    for account, sid, op, key, at in diverged_calls(conn, schema, vias, times):
        if op not in ON_THE_WAY:
            kept.setdefault((account, at), []).append((stream_order(sid), sid, key))
    calls: dict[str, tuple[str, str, str]] = {}  # ancestor entry -> via, key, its own entry
    for entry in ancestors:
        at = stream_order(entry[0])
        before = [c for c in kept.get((entry[8], entry[12]), []) if c[0] < at]
        if before:
            _order, own_id, key = max(before)
            if key is not None:
                calls[entry[0]] = (entry[8], key, own_id)
    if not calls:
        return set()
    elsewhere: dict[tuple[str, str], set[str]] = {}
    for account, key, op, sid in applied_calls(
        conn, schema, sorted({c[:2] for c in calls.values()})
    ):
        if op not in ON_THE_WAY:
            elsewhere.setdefault((account, key), set()).add(sid)
    return {
        sid
        for sid, (via, key, own_id) in calls.items()
        if elsewhere.get((via, key), set()) - {own_id}
    }


def cap_target(
    base: CapUse | None,
    pg: CapUse | None,
    entries: Sequence[tuple[Any, ...]],
    repeated: Collection[str],
) -> CapUse | None:
    """The cap's use after the re-base (None: no use on either side).

    ``base``: the use before the fork's first entry; ``pg``: PostgreSQL's now;
    ``entries``: the fork's (``fork_entries`` rows); ``repeated``: stream ids of
    those that repeat a call of PostgreSQL's side.
    """
    before: CapUse | None = base
    repeats: dict[int, tuple[int, int]] = {}
    for entry in sorted(entries, key=lambda e: stream_order(e[0])):
        if entry[9] is None:
            continue
        use: CapUse = (int(entry[9]), int(entry[10]), int(entry[11]))
        counted = (
            use[1:]
            if before is None or before[0] != use[0]
            else (
                use[1] - before[1],
                use[2] - before[2],
            )
        )
        if entry[0] in repeated:
            c, m = repeats.get(use[0], (0, 0))
            repeats[use[0]] = (c + counted[0], m + counted[1])
        before = use
    windows = [u[0] for u in (before, pg) if u is not None]
    if not windows:
        return None
    window = max(windows)

    def within(u: CapUse | None) -> tuple[int, int]:
        return (u[1], u[2]) if u is not None and u[0] == window else (0, 0)

    on_pg, in_redis, at_base = within(pg), within(before), within(base)
    again = repeats.get(window, (0, 0))
    return (
        window,
        max(on_pg[0] + in_redis[0] - at_base[0] - again[0], 0),
        max(on_pg[1] + in_redis[1] - at_base[1] - again[1], 0),
    )
