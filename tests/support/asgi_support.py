"""Real ASGI servers for the middleware tests: uvicorn in a thread of its own, on loopback.

The server thread runs its own event loop, so the app's AsyncRedCredit is
made, used and closed there, while the test talks to it with httpx from the
test's loop, as a real client would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn

from redcredit import AsyncRedCredit, Settings
from redcredit.servers.spawn import free_port

Build = Callable[[AsyncRedCredit], Any]

# The app that test_asgi SIGKILLs (tests/support/asgi_app.py): who pays, what it holds, for how long.
KILLED_ACCOUNT = "killed"
KILLED_MAX_COST = 50
KILLED_TTL_S = 2


class ServedApp:
    """``build(client)`` returns the ASGI app to serve; ``app`` is what it returned.

    Use as a context manager; ``url`` is where it listens.
    """

    def __init__(self, settings: Settings, build: Build, *, lifespan: str = "auto") -> None:
        self.settings = settings
        self.build = build
        self.lifespan = lifespan
        self.app: Any = None
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServedApp:
        for _attempt in range(5):
            self.port = free_port()
            self._failure = None
            self._thread = threading.Thread(target=self._run, name="uvicorn", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self._server is not None and self._server.started:
                    return self
                if not self._thread.is_alive():
                    break
                time.sleep(0.01)
            # Another process took the port before uvicorn bound it: try another.
            self._stop()
        raise RuntimeError(f"uvicorn did not start: {self._failure!r}")

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self._server = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # uvicorn exits with SystemExit when it cannot bind
            self._failure = exc

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with AsyncRedCredit(settings=self.settings) as client:
            self.app = self.build(client)
            config = uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                lifespan=self.lifespan,
                ws="none",
                log_config=None,
                log_level="warning",
                timeout_graceful_shutdown=2,
            )
            self._server = uvicorn.Server(config)
            await self._server.serve()

    def call(self, work: Callable[[], Awaitable[Any]], timeout: float = 10) -> Any:
        """Runs ``work()`` on the server's loop (to touch objects that live there)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(work(), self._loop).result(timeout)


def http(url: str, **options: Any) -> httpx.AsyncClient:
    # trust_env=False: a proxy configured in the environment must not see loopback traffic.
    return httpx.AsyncClient(base_url=url, trust_env=False, timeout=10, **options)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Waits until ``check()`` is true; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)
