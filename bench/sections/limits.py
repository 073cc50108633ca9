"""The ``limits`` library (limits.aio) against the same Redis, for comparison."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..harness import CONCURRENCY, Config, MakeOp, Op, Results, Servers, async_point


def run(cfg: Config, servers: Servers, res: Results) -> None:
    from limits import parse
    from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
    from limits.storage import storage_from_string

    url, port = servers.redis_url, servers.redis_port
    item = parse("1000000000/second")
    runs = [("moving", c) for c in CONCURRENCY] + [("fixed", 64)]
    for kind, callers in runs:

        async def setup(kind: str = kind) -> tuple[MakeOp, Callable[[], Awaitable[None]]]:
            storage = storage_from_string(f"async+redis://127.0.0.1:{port}")
            cls = MovingWindowRateLimiter if kind == "moving" else FixedWindowRateLimiter
            limiter = cls(storage)  # type: ignore[arg-type]

            async def make_op(i: int) -> Op:
                async def op() -> int:
                    assert await limiter.hit(item, "bench", "hot")
                    return 1

                return op

            async def cleanup() -> None:
                await storage.reset()

            return make_op, cleanup

        res.points.append(
            async_point(cfg, url, "limits", f"limits {kind} window hit", callers, setup)
        )
