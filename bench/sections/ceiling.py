"""What Redis itself gives for redcredit's debit script, without redcredit's client around it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import hiredis
import redis

from redcredit import RedCredit, Settings
from redcredit.core.engine import Engine, ScriptCall
from redcredit.servers.redis import find_redis_server

from ..harness import (
    Config,
    MakeOp,
    Op,
    Results,
    Servers,
    Setup,
    async_point,
    over_sockets,
    rc_settings,
    trim_journals,
)

# --- a minimal RESP client ------------------------------------------------------------------


def resp_command(*parts: str | int | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def evalsha_bytes(call: ScriptCall) -> bytes:
    return resp_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)


def spend_call(settings: Settings, account: str) -> ScriptCall:
    step = next(Engine(settings).spend(account, cost=1))
    assert isinstance(step, ScriptCall)
    return step


def raw_evalsha(port: int, one: bytes, depth: int) -> Setup:
    """``depth`` copies of the call per write on each connection; replies parsed by hiredis."""
    batch = one * depth

    def make(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Op:
        parser = hiredis.Reader()

        async def op() -> int:
            writer.write(batch)
            got = 0
            while got < depth:
                parser.feed(await reader.read(1 << 16))
                while (reply := parser.gets()) is not False:
                    assert reply[0] == 0, reply
                    got += 1
            return depth

        return op

    return over_sockets(port, make)


# --- the section ----------------------------------------------------------------------------


def run(cfg: Config, servers: Servers, res: Results) -> None:
    url, port = servers.redis_url, servers.redis_port
    settings = rc_settings(url)
    with RedCredit(settings=settings) as rc:
        rc.spend("hot", cost=1)  # creates the account and loads the script
    call = spend_call(settings, "hot")
    one = evalsha_bytes(call)

    res.points.append(
        async_point(
            cfg, url, "ceiling", "raw RESP EVALSHA, unpipelined", 64, raw_evalsha(port, one, 1)
        )
    )
    res.points.append(
        async_point(
            cfg,
            url,
            "ceiling",
            "raw RESP EVALSHA, pipelined x16",
            256,
            raw_evalsha(port, one, 16),
            note="16 connections x 16 calls per write",
            workers=16,
        )
    )

    async def redis_py() -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
        client = redis.asyncio.Redis.from_url(url, max_connections=64)

        async def make_op(i: int) -> Op:
            async def op() -> int:
                await client.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
                return 1

            return op

        return make_op, client.aclose

    res.points.append(
        async_point(cfg, url, "ceiling", "redis-py EVALSHA, 1 call/round trip", 64, redis_py)
    )
    trim_journals(settings)
    redis_benchmark(cfg, port, call, settings, res)


def benchmark_binary() -> str | None:
    """``redis-benchmark`` or ``valkey-benchmark``, on PATH or beside the server binary."""
    beside = Path(find_redis_server()).parent
    return (
        shutil.which("redis-benchmark")
        or shutil.which("valkey-benchmark")
        or next(
            (
                str(p)
                for p in (beside / "redis-benchmark", beside / "valkey-benchmark")
                if p.is_file()
            ),
            None,
        )
    )


def redis_benchmark(
    cfg: Config, port: int, call: ScriptCall, settings: Settings, res: Results
) -> None:
    binary = benchmark_binary()
    if not binary:
        res.extra["redis-benchmark"] = "not on PATH (optional)"
        return
    n = min(cfg.max_ops, 200_000 if not cfg.quick else 20_000)
    args = ["EVALSHA", call.script.sha, str(len(call.keys)), *map(str, call.keys)]
    args += [str(a) for a in call.args]
    for pipeline in (1, 16):
        done = subprocess.run(
            [
                binary,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-c",
                "64",
                "-n",
                str(n),
                "-P",
                str(pipeline),
                "-q",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        res.extra[f"redis-benchmark -P {pipeline}"] = done.stdout.strip()[-300:]
    trim_journals(settings)
