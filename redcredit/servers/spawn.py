"""What every embedded server shares: ports, the child process, its folder, and cleaning up.

A server started here never outlives the Python process that started it: it is
stopped when its object is garbage-collected or the interpreter exits, and on
Linux the kernel kills it if the process dies without running any Python
(SIGKILL, an unhandled SIGTERM).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from ..errors import EmbeddedServerError

__all__ = [
    "LOG_TAIL_CHARS",
    "EmbeddedServer",
    "NotReady",
    "children",
    "free_port",
    "gone",
    "scratch_dir",
]

LOG_TAIL_CHARS = 3000


def free_port(*, plus: int = 0) -> int:
    """A loopback TCP port that nothing listens on right now.

    With ``plus``, ``port + plus`` is free too (a Redis Cluster node also binds
    its bus port, 10000 above its own). Another process can still take the port
    before the server binds it, so callers retry on "address in use".
    """
    for _attempt in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            if not plus:
                return port
            if port + plus > 65535:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as partner:
                    partner.bind(("127.0.0.1", port + plus))
            except OSError:
                continue
            return port
    raise EmbeddedServerError(f"found no free loopback port p with p+{plus} free as well")


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder, removed when the interpreter exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    # Whatever runs from it keeps the inodes of the files it has open.
    atexit.register(shutil.rmtree, folder, True)
    return folder


def children(pid: int) -> list[int]:
    """Child processes of pid (read from /proc: Linux only, none found elsewhere)."""
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            text = (entry / "stat").read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """No such process, or only a zombie: an orphaned one holds nothing, and init reaps it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2 :].startswith("Z")


_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when this process dies.

    That covers deaths that run no Python at all (SIGKILL, a default SIGTERM),
    where atexit never runs. Linux ties the signal to the *thread* that forks,
    so it is only used from the main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    args = (ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL))

    def hook() -> None:
        prctl(*args)
        # The parent may have died between fork and prctl: nobody would signal us then.
        if os.getppid() != parent:
            os._exit(1)

    return hook


class _Child:
    """A started process and the private folder that goes with it.

    Holds no reference to the server object, so a finaliser can own it.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.private_dir: Path | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        if self.process is not None:
            self.process.wait()

    def remove_private_dir(self) -> None:
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None

    def reap(self) -> None:
        """Kill and clean up; what the finaliser runs for a server nobody stopped."""
        self.kill()
        self.remove_private_dir()


class NotReady(Exception):
    """The server is up but not serving yet (still binding, loading its data...)."""


class EmbeddedServer(ABC):
    """A server process on 127.0.0.1 with a data folder, for the demo and the tests.

    Subclasses say how to run the binary and how to tell it is ready; this
    class picks the port, starts, waits, stops, kills and cleans up. The port is
    picked on the first start and kept, so a restarted server is where its
    clients expect it.
    """

    name: ClassVar[str] = "server"
    # Postgres, for one, wants SIGINT for a fast shutdown.
    _stop_signal: ClassVar[int] = signal.SIGTERM
    _stop_timeout: ClassVar[float] = 10.0
    _start_attempts: ClassVar[int] = 5

    def __init__(self, *, data_dir: Path | None = None, startup_timeout: float = 10.0) -> None:
        self._explicit_dir = Path(data_dir) if data_dir is not None else None
        self._startup_timeout = startup_timeout
        self._port: int | None = None
        self._child = _Child()
        # Runs on garbage collection and at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, self._child.reap)

    # -- what a subclass provides

    @abstractmethod
    def _command(self) -> list[str]:
        """The full command line for the current port and data folder."""

    @abstractmethod
    def _probe(self) -> None:
        """Return once the server serves; raise NotReady (or OSError) while it does not."""

    def _port_gap(self) -> int:
        """Offset of a second port the server binds (0 for none)."""
        return 0

    def _after_start(self, deadline: float) -> None:
        """Work on a freshly started, ready server (before start() returns)."""
        return

    def _spawn_options(self) -> dict[str, Any]:
        """Further ``Popen`` arguments of a subclass (the user to run as, say)."""
        return {}

    # -- state

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServerError(f"the {self.name} has not been started, so it has no port")
        return self._port

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        process = self._child.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        return self._child.alive()

    @property
    def data_dir(self) -> Path:
        folder = self._explicit_dir or self._child.private_dir
        if folder is None:
            raise EmbeddedServerError(f"the {self.name} has not been started, so it has no data")
        return folder

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def _console_path(self) -> Path:
        # What the binary prints before its own log is open (bad options, for one).
        return self.data_dir / "server.console"

    # -- lifecycle

    def start(self) -> Self:
        """Start the server and return once it serves; raises EmbeddedServerError."""
        if self.running:
            raise EmbeddedServerError(f"the {self.name} on port {self._port} is already running")
        self._prepare_dir()
        fixed_port = self._port is not None
        attempts = 1 if fixed_port else self._start_attempts
        for attempt in range(1, attempts + 1):
            if not fixed_port:
                self._port = free_port(plus=self._port_gap())
            deadline = time.monotonic() + self._startup_timeout
            self._spawn()
            try:
                self._wait_ready(deadline)
                self._after_start(deadline)
            except EmbeddedServerError:
                self._child.kill()
                port_race = "address already in use" in self._output_tail().lower()
                if not port_race or fixed_port or attempt == attempts:
                    raise
                # Someone took the port between our probe and the server's bind.
                self._truncate_logs()
                continue
            except BaseException:
                # Ctrl-C or a bug mid-start: no half-started server is left behind.
                self._child.kill()
                raise
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down gracefully (SIGKILL after ``timeout`` s); a private data folder goes too."""
        self._halt(timeout)
        self._child.remove_private_dir()

    def kill(self) -> None:
        """SIGKILL, as in a crash: nothing is flushed, and the data folder stays."""
        self._child.kill()

    def restart(self) -> Self:
        """Start again on the same port and data folder (shutting down gracefully if running).

        A server whose :meth:`stop` removed its private data folder starts empty;
        for a crash and its recovery, :meth:`kill` first.
        """
        self._halt(self._stop_timeout)
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} port={self._port} {state}>"

    # -- internals

    def _halt(self, timeout: float) -> None:
        """The stop signal, then :meth:`kill` if the server is still there after ``timeout`` s."""
        process = self._child.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self._stop_signal)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        process.wait()

    def _prepare_dir(self) -> None:
        if self._explicit_dir is not None:
            self._explicit_dir.mkdir(parents=True, exist_ok=True)
        elif self._child.private_dir is None:
            self._child.private_dir = Path(tempfile.mkdtemp(prefix=f"redcredit-{self.name}-"))

    def _spawn(self) -> None:
        command = self._command()
        with open(self._console_path, "ab") as console:
            try:
                self._child.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # Its own session: a Ctrl-C meant for the test runner does not
                    # reach it before the fixtures' teardown, and a SIGKILL aimed at
                    # its pid hits nothing else.
                    start_new_session=True,
                    preexec_fn=_die_with_parent_hook(),
                    **self._spawn_options(),
                )
            except OSError as exc:
                raise EmbeddedServerError(f"could not run {command[0]}: {exc}") from exc

    def _wait_ready(self, deadline: float) -> None:
        pause = 0.01
        last_reason = "no answer yet"
        while True:
            process = self._child.process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise self._failure(f"exited with status {code} while starting")
            try:
                self._probe()
            except (NotReady, OSError) as exc:
                last_reason = str(exc) or type(exc).__name__
            else:
                # A server of someone else's may have answered on a port ours failed to bind.
                if process.poll() is None:
                    return
            if time.monotonic() >= deadline:
                raise self._failure(
                    f"was not ready after {self._startup_timeout:g} s (last: {last_reason})"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _failure(self, what: str) -> EmbeddedServerError:
        return EmbeddedServerError(
            f"the {self.name} on 127.0.0.1:{self._port} {what}.\n"
            f"command: {shlex.join(self._command())}\n"
            f"output and log (last lines):\n{self._output_tail()}"
        )

    def _output_tail(self) -> str:
        parts = []
        for path in (self._console_path, self.log_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    parts.append(text[-LOG_TAIL_CHARS:])
        return "\n".join(parts) or "(nothing logged)"

    def _truncate_logs(self) -> None:
        for path in (self._console_path, self.log_path):
            with contextlib.suppress(OSError):
                path.unlink()
