"""A loopback TCP proxy for tests: TLS in front of a plain server, and network stalls.

``NetProxy(upstream_port)`` listens on ``127.0.0.1:proxy.port`` and forwards
every connection to ``127.0.0.1:upstream_port``; its event loop runs in a
thread of its own, so sync and async tests use it alike::

    with NetProxy(server.port) as proxy:
        client = redis.Redis(port=proxy.port)
        proxy.pause()    # connections stay open, nothing moves either way
        ...              # client calls now block until their timeout
        proxy.resume()   # what was held back is delivered, in order

``tls`` (a server-side :class:`ssl.SSLContext`) makes the proxy the TLS end
that clients talk to, in front of a server that has no TLS of its own.

Pause semantics: once :meth:`pause` returns, no further byte is written to
either side, no new connection is forwarded (a TLS handshake stalls too), and
no connection is closed: a peer that hangs up is closed on the other side
only on :meth:`resume`. Data already handed to the kernel before the pause
may still arrive. Bytes are held back, never dropped, so after :meth:`resume`
both ends see the same stream as without the pause, only later.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from types import TracebackType
from typing import Self

__all__ = ["NetProxy"]

_CHUNK = 64 * 1024


class NetProxy:
    """Forwards loopback TCP connections to ``upstream_host:upstream_port``; see the module doc."""

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.tls = tls
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._paused = False

    # -- public ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port clients connect to (known once started)."""
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._tasks)

    def start(self) -> Self:
        """Starts listening on a free loopback port; returns the proxy."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="netproxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def pause(self) -> None:
        """Stalls every connection, both ways, until :meth:`resume`; effective on return."""
        self._set_flowing(False)

    def resume(self) -> None:
        """Delivers what was held back and lets traffic flow again."""
        self._set_flowing(True)

    def close(self) -> None:
        """Closes every connection and stops listening. Safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        self._thread = None

    def __enter__(self) -> Self:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "paused" if self._paused else "flowing"
        host, port = self.upstream
        tls = " tls" if self.tls is not None else ""
        return f"<NetProxy :{self._port} -> {host}:{port}{tls} {state}>"

    # -- the loop's side ----------------------------------------------------------------

    def _set_flowing(self, flowing: bool) -> None:
        loop, thread = self._loop, self._thread
        if thread is None or loop is None:
            raise RuntimeError("the proxy is not started")
        if threading.get_ident() == thread.ident:
            raise RuntimeError("pause() and resume() are called from outside the proxy's loop")

        async def apply() -> None:
            assert self._flowing is not None
            self._paused = not flowing
            if flowing:
                self._flowing.set()
            else:
                self._flowing.clear()

        # Waiting until the loop has run it is what makes pause() effective on
        # return: the pumps check the event and write with no await in between.
        asyncio.run_coroutine_threadsafe(apply(), loop).result(10)

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _gate(self) -> None:
        assert self._flowing is not None
        # A loop, not one wait: pause() may clear the event after it woke this
        # waiter but before the waiter ran.
        while not self._flowing.is_set():
            await self._flowing.wait()

    def _accepted(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # A task of our own rather than asyncio's callback task: close() cancels
        # it, and a cancelled callback task makes asyncio log a spurious error.
        task = asyncio.ensure_future(self._serve(client_r, client_w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        upstream_w: asyncio.StreamWriter | None = None
        try:
            await self._gate()
            if self.tls is not None:
                await client_w.start_tls(self.tls)
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream_w)
            pumps = [
                asyncio.ensure_future(self._pump(client_r, upstream_w)),
                asyncio.ensure_future(self._pump(upstream_r, client_w)),
            ]
            try:
                await asyncio.gather(*pumps)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            # A refused TLS handshake (ssl.SSLError) or a reset: the connection
            # simply ends, as it would on a network.
            pass
        finally:
            for writer in (client_w, upstream_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(_CHUNK)
            await self._gate()
            if not data:
                # One side hung up: so does the other (Redis needs no half-close).
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()
