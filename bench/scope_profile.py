"""Where the Redis CPU of a spend on a path of a tree goes.

    python -m bench.scope_profile                 # timings on a plain server
    python -m bench.scope_profile --callgrind     # instructions, under valgrind's callgrind

The debit script exactly as ``Engine.spend`` builds it, one call in flight, on the ``scopes``
section's setups (a plain account, then paths of 1 to 4 levels whose root pays, a middle level
capped or not, and 3 levels with 8 buckets at the root), and on variants of the script with one
step taken out (for measuring only: a variant is no correct script), as
``bench.bucket_profile`` does for buckets and with its readers: timings are the best round of
``--rounds`` (``INFO commandstats``), instruction counts do not depend on the machine's load.
Under callgrind it also says where the shipped script's instructions go, for each setup.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import redis

from redcredit import AsyncRedCredit, Settings
from redcredit.core.engine import Engine
from redcredit.core.steps import ScriptCall
from redcredit.servers.redis import EmbeddedRedis

from .bucket_profile import (
    DEBIT_BODY,
    Callgrind,
    Reader,
    Timer,
    callgrind_server,
    print_functions,
    run_calls,
)
from .harness import rc_settings
from .sections.buckets import AccountSetup
from .sections.scopes import SPEND

# A step of a call on a path taken out: (name, the text replaced, its replacement).
VARIANTS = (
    ("without the journal's XADD (every level's)", "  redis.call(unpack(entry))\n", ""),
    (
        "without the entry and balances of a level that only counts (its cap)",
        "    if i == 1 or paid_c[i] > 0 or paid_m[i] > 0 or counted or covered[i] then",
        "    if i == 1 or paid_c[i] > 0 or paid_m[i] > 0 or covered[i] then",
    ),
    (
        "without the cap's HSET",
        "  redis.call(unpack(writes))\n  return {'kw'",
        "  return {'kw'",
    ),
    (
        "without the ancestors' catch-up (holds, bucket events, plan, refills)",
        "  each_level(levels, function(_, i) limits[i] = catch_up(with_refills) end)",
        "  each_level(levels, function(level, i)\n"
        "    if i == 1 then limits[i] = catch_up(with_refills)\n"
        "    else limits[i], level.overdraft = '', 0 end\n"
        "  end)",
    ),
    (
        "the levels loaded and checked against the tree, then return",
        "local limits = catch_up_path(levels, true)\n",
        "do return {0} end\n",
    ),
)


@dataclass(frozen=True)
class Target:
    setup: AccountSetup
    call: ScriptCall


def prepare(url: str) -> list[Target]:
    """One tree (or account) per setup, made and spent on once; the debit call for each."""
    targets = []
    for setup in SPEND.setups:
        settings = rc_settings(url, key_prefix="prof", **dict(setup.settings))
        root = "p-" + re.sub("[^a-z0-9]+", "-", setup.name)

        asyncio.run(_make(settings, setup, root))
        step = next(Engine(settings).spend(setup.target(root), cost=1))
        if not isinstance(step, ScriptCall):
            raise TypeError(f"spend first yields a script call, not {step!r}")
        targets.append(Target(setup, step))
    return targets


async def _make(settings: Settings, setup: AccountSetup, root: str) -> None:
    async with AsyncRedCredit(settings=settings) as rc:
        await setup.prepare(rc, root)
        await rc.spend(setup.target(root), cost=1)


def variants(source: bytes) -> list[tuple[str, bytes]]:
    text = source.decode()
    found = [("as shipped", source)]
    for name, old, new in VARIANTS:
        if text.count(old) != 1:
            raise ValueError(f"{name}: the script no longer has the step this variant removes")
        found.append((name, text.replace(old, new).encode()))
    if text.count(DEBIT_BODY) != 1:
        raise ValueError("debit.lua no longer starts where this profile expects")
    shared = text[: text.index(DEBIT_BODY)]
    found.append(
        ("the shared files alone (debit's body: return)", f"{shared}return {{0}}\n".encode())
    )
    return found


def profile(url: str, reader: Reader, calls: int) -> None:
    """The table of variants by setup, and (under callgrind) where the instructions go."""
    targets = prepare(url)
    functions: dict[str, dict[str, int]] = {}
    with redis.Redis.from_url(url) as conn:
        shipped = targets[0].call.script.source
        print(f"\ndebit script, {reader.unit} per call ({calls} calls one after another)")
        print("| variant | " + " | ".join(t.setup.name for t in targets) + " |")
        print("|---" * (len(targets) + 1) + "|")
        for name, source in variants(shipped):
            sha = str(conn.script_load(source))
            cells = []
            for target in targets:
                run_calls(conn, sha, target.call, 5)  # its first call compiles the script
                work = functools.partial(run_calls, conn, sha, target.call, calls)
                cells.append(reader.cost(work, "evalsha") / calls)
                if name == "as shipped" and isinstance(reader, Callgrind):
                    functions[target.setup.name] = dict(reader.profile)
            print(f"| {name} | " + " | ".join(f"{c:,.1f}" for c in cells) + " |")
    for setup, found in functions.items():
        print_functions(setup, found, calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scope_profile", description=__doc__)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--calls", type=int, help="calls per reading (2000; 200 callgrind)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per timing")
    parser.add_argument("--keep", type=Path, help="keep the callgrind dumps in this folder")
    args = parser.parse_args(argv)
    if not args.callgrind:
        with EmbeddedRedis() as server, redis.Redis.from_url(server.url) as conn:
            profile(server.url, Timer(conn, args.rounds), args.calls or 2000)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        with callgrind_server(folder) as (url, pid):
            profile(url, Callgrind(pid, folder), args.calls or 200)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
