"""Where the Redis CPU of a spend on an account with credit buckets goes.

    python -m bench.bucket_profile                 # timings on a plain server
    python -m bench.bucket_profile --callgrind     # instructions, under valgrind's callgrind

The debit script exactly as ``Engine.spend`` builds it, one call in flight, on accounts with no
grant, 1, 8 and 32 grants (the ``buckets`` section's setups); variants of the script with
one step taken out (for measuring only: a variant is no correct script); and the same script
as a Redis Function, whose shared files run once, when it is loaded, not at every call.
Timings are the best round of ``--rounds`` (``INFO commandstats``), since other work on the
machine only adds to them; instruction counts do not depend on it. Both modes also price the
pieces of a bucket spend alone, by EVAL loops on an account's own packed buckets and on other
layouts of the same values.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import shutil
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from redcredit import AsyncRedCredit, Settings
from redcredit.core.engine import Engine
from redcredit.core.steps import ScriptCall
from redcredit.servers.redis import EmbeddedRedis, find_redis_server
from redcredit.servers.spawn import free_port

from .sections.buckets import PLAIN, AccountSetup, with_buckets

SETUPS = (PLAIN, with_buckets(1), with_buckets(8), with_buckets(32))
# A step of the debit script taken out: (name, the text replaced, its replacement).
VARIANTS = (
    (
        "without the bk field of the entry",
        "  if ctx.bchanged and #ctx.bchanged > 0 then",
        "  if false then",
    ),
    (
        "without saving the buckets (pack, HSET)",
        "    ctx.B = cmsgpack.pack(kept)\n"
        "    redis.call('HSET', ctx.acct, 'B', ctx.B, 'N', due, 'O', settings_line)",
        "    ctx.B = ctx.B",
    ),
    (
        "packing without the HSET",
        "    redis.call('HSET', ctx.acct, 'B', ctx.B, 'N', due, 'O', settings_line)",
        "    ctx.B = ctx.B",
    ),
    ("without the journal's XADD", "  redis.call(unpack(entry))\n", ""),
)
# Where debit.lua's own body starts, after the shared files.
DEBIT_BODY = "local replay = idem_replay()"
# The pieces of a bucket spend alone, each repeated ARGV[1] times in one EVAL, on the account's
# packed buckets as stored (B), and on other layouts of the same values a script could keep:
# one flat array (F); the fields a spend changes or reads (remaining, held, live) apart, as
# struct doubles (S); a single bucket's record (R), as when each bucket had a field of its own.
PIECES = {
    "unpack, as stored": "local x = cmsgpack.unpack(B)",
    "pack, as stored": "local x = cmsgpack.pack(t)",
    "unpack, one flat array": "local x = cmsgpack.unpack(F)",
    "pack, one flat array": "local x = cmsgpack.pack(f)",
    "unpack, remaining/held/live (struct)": "local x = {struct.unpack(SF, S)}",
    "pack, remaining/held/live (struct)": "local x = struct.pack(SF, unpack(d))",
    "unpack and pack one bucket's record": "local x = cmsgpack.pack(cmsgpack.unpack(R))",
    "HSET of the packed buckets": "redis.call('HSET', KEYS[2], 'B', B)",
}
PIECE_LOOP = """
local B = redis.call('HGET', KEYS[1], 'B')
local t = cmsgpack.unpack(B)
local f = {}
for _, b in ipairs(t) do
  for j = 1, #b do f[#f + 1] = b[j] end
end
local F = cmsgpack.pack(f)
local d = {}
for _, b in ipairs(t) do
  d[#d + 1], d[#d + 2], d[#d + 3] = b[2], b[3], b[10]
end
local SF = string.rep('d', #d)
local S = struct.pack(SF, unpack(d))
local R = cmsgpack.pack(t[1])
for i = 1, tonumber(ARGV[1]) do
  %s
end
return #B
"""
# Inclusive instructions of these functions, per call (callgrind mode).
FUNCTIONS = {
    "evalShaCommand": "the script, all of it",
    "luaRedisCallCommand": "redis.call (HMGET, HSET, HINCRBY, XADD, TIME)",
    "xaddCommand": "  XADD",
    "hsetCommand": "  HSET",
    "hmgetCommand": "  HMGET",
    "hincrbyCommand": "  HINCRBY",
    "mp_unpack": "cmsgpack.unpack",
    "mp_pack": "cmsgpack.pack",
    "table_is_an_array": "  pack's check that each table is an array",
    "auxsort": "table.sort",
    "luaC_step": "Lua garbage collector",
    "luaF_newLclosure": "closures (the shared files' functions, made anew each call)",
    "luaF_findupval": "  their upvalues, searched for among the chunk's open ones",
    "luaM_realloc_": "Lua allocations",
    "newkey": "new keys in Lua tables",
    "str_format": "string.format",
    "str_find_aux": "string.find (the rules: a plan's line, calendar starts)",
    "gmatch_aux": "split (string.gmatch)",
    "readQueryFromClient": "reading and running the request",
}


@dataclass(frozen=True)
class Target:
    setup: AccountSetup
    call: ScriptCall


def prepare(url: str) -> tuple[Settings, list[Target]]:
    """One account per setup, made and spent on once; the debit call for each."""
    settings = Settings(redis_url=url, key_prefix="prof", free_credits=2**52)
    engine = Engine(settings)

    async def go() -> None:
        async with AsyncRedCredit(settings=settings) as rc:
            for setup in SETUPS:
                await setup.prepare(rc, account(setup))
                await rc.spend(account(setup), cost=1)

    asyncio.run(go())
    targets = []
    for setup in SETUPS:
        step = next(engine.spend(account(setup), cost=1))
        if not isinstance(step, ScriptCall):
            raise TypeError(f"spend first yields a script call, not {step!r}")
        targets.append(Target(setup, step))
    return settings, targets


def account(setup: AccountSetup) -> str:
    return "p-" + re.sub("[^a-z0-9]+", "-", setup.name)


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
    found.append(("an empty script (return)", b"return {0}\n"))
    return found


Work = Callable[[], None]


class Reader(ABC):
    """What some work costs the server: µs (timing mode) or instructions (callgrind mode)."""

    unit: str

    @abstractmethod
    def cost(self, work: Work, command: str) -> float:
        """The cost of ``work``, whose calls are all of ``command`` (evalsha or eval)."""


class Timer(Reader):
    unit = "us"

    def __init__(self, conn: redis.Redis, rounds: int) -> None:
        self.conn, self.rounds = conn, rounds

    def cost(self, work: Work, command: str) -> float:
        # Other work on the machine only ever adds to a reading: the best round is the truest.
        best = float("inf")
        for _ in range(self.rounds):
            before = self._usec(command)
            work()
            best = min(best, self._usec(command) - before)
        return best

    def _usec(self, command: str) -> int:
        stats = self.conn.info("commandstats").get(f"cmdstat_{command}", {})
        return int(stats.get("usec", 0))


class Callgrind(Reader):
    unit = "instructions"

    def __init__(self, pid: int, folder: Path) -> None:
        self.pid, self.folder = pid, folder
        self.profile: dict[str, int] = {}

    def cost(self, work: Work, command: str) -> float:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], check=True, capture_output=True)
        work()
        before = set(self.folder.glob("callgrind.out*"))
        subprocess.run(["callgrind_control", "-d", str(self.pid)], check=True, capture_output=True)
        dump = sorted(set(self.folder.glob("callgrind.out*")) - before)[-1]
        text = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        self.profile = _inclusive(text)
        return self.profile.get("PROGRAM TOTALS", 0)


def run_calls(conn: redis.Redis, sha: str, call: ScriptCall, n: int) -> None:
    for _ in range(n):
        conn.evalsha(sha, len(call.keys), *call.keys, *call.args)


# The shipped script as a Redis Function: the shared files run once, when the library is
# loaded, and each call only sets up its context (the lines from CTX_OPEN to TIME_END).
FUNCTION_ROW = "as a Redis Function (FCALL: the shared files run once, at FUNCTION LOAD)"
CTX_OPEN = "local ctx = {\n"
TIME_END = (
    "  ctx.now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])\n"
    "end\n"
)


def as_library(source: str) -> str:
    shared, body = source.split(DEBIT_BODY, 1)
    if shared.count(CTX_OPEN) != 1 or shared.count(TIME_END) != 1:
        raise ValueError("_prelude.lua no longer sets up its context where this profile expects")
    shared = shared.replace(CTX_OPEN, "local ctx\nlocal function begin(KEYS, ARGV)\nctx = {\n")
    shared = shared.replace(TIME_END, TIME_END + "end\n")
    # settings_line caches what a call parses of its rules: per call, as a script has it.
    return (
        f"#!lua name=bucket_profile\n{shared}"
        "redis.register_function('debit', function(KEYS, ARGV)\n"
        f"begin(KEYS, ARGV)\nsettings_line = nil\n{DEBIT_BODY}{body}\nend)\n"
    )


def run_fcalls(conn: redis.Redis, call: ScriptCall, n: int) -> None:
    for _ in range(n):
        reply = conn.fcall("debit", len(call.keys), *call.keys, *call.args)
        if reply[0] != 0:
            raise RuntimeError(f"the debit function refused: {reply!r}")


def profile(url: str, reader: Reader, calls: int) -> None:
    """Both tables, and (under callgrind) where the shipped script's instructions go."""
    settings, targets = prepare(url)
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
        conn.function_load(as_library(shipped.decode()), replace=True)
        cells = []
        for target in targets:
            run_fcalls(conn, target.call, 5)
            cells.append(
                reader.cost(functools.partial(run_fcalls, conn, target.call, calls), "fcall")
            )
        print(f"| {FUNCTION_ROW} | " + " | ".join(f"{c / calls:,.1f}" for c in cells) + " |")
        pieces(conn, reader, settings, targets, calls)
    for setup, found in functions.items():
        print_functions(setup, found, calls)


def pieces(
    conn: redis.Redis, reader: Reader, settings: Settings, targets: list[Target], calls: int
) -> None:
    print(f"\npieces alone, {reader.unit} each ({calls} in one EVAL, less an empty loop's)")
    print("| buckets | packed bytes | " + " | ".join(PIECES) + " |")
    print("|---|---|" + "---|" * len(PIECES))
    scratch = Engine(settings).keys.for_account("p-scratch").hash
    for target in targets[1:]:
        key = target.call.keys[0]

        def loop(body: str, key: str = key) -> Work:
            return lambda: conn.eval(PIECE_LOOP % body, 2, key, scratch, calls) and None

        empty = reader.cost(loop(""), "eval")
        cells = [(reader.cost(loop(body), "eval") - empty) / calls for body in PIECES.values()]
        size = conn.eval(PIECE_LOOP % "", 2, key, scratch, 0)
        print(
            f"| {target.setup.buckets} | {size} | " + " | ".join(f"{c:,.2f}" for c in cells) + " |"
        )


@contextmanager
def callgrind_server(folder: Path) -> Iterator[tuple[str, int]]:
    """A server under callgrind (the binary EmbeddedRedis would run)."""
    binary = str(find_redis_server())
    port = free_port()
    out = folder / "callgrind.out"
    proc = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary,
            "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(folder),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with redis.Redis.from_url(url) as conn:
                    conn.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


def _inclusive(text: str) -> dict[str, int]:
    """Inclusive Ir by function name (and the program's total) from callgrind_annotate."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(?:PROGRAM TOTALS|\S+?:(\S+?)\b)", line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        name = "PROGRAM TOTALS" if "PROGRAM TOTALS" in line else m.group(2)
        found[name] = max(found.get(name, 0), ir)
    return found


def print_functions(setup: str, profile: dict[str, int], calls: int) -> None:
    total = profile.get("PROGRAM TOTALS", 0)
    print(f"\n{setup}: {total // calls:,} instructions per call, inclusive:")
    for function, what in FUNCTIONS.items():
        ir = profile.get(function, 0)
        print(f"  {ir // calls:>9,}  {ir / total:6.1%}  {what} ({function})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bucket_profile", description=__doc__)
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
