"""The servers and processes of one simulation run, and the faults done to them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis

from redcredit import Settings
from redcredit.backends.migrate import migrate
from redcredit.config import LimitSettings, PlanSettings, RefillSettings
from redcredit.servers.postgres import EmbeddedPostgres
from redcredit.servers.redis import EmbeddedRedis
from tests.support.netproxy import NetProxy

REPO = Path(__file__).resolve().parents[3]
SCHEMA = "sim"
REVEAL = {"reveal_secrets": True}  # the child processes need the real URLs
HOLD_TTL_S = 2  # reservations of the killed client lapse this long after they were made

PLANS = {
    # Free accounts meet a request rate limit; metered ones a credit bucket and
    # a rolling refill; paid and demo bypass, and still journal their usage.
    "free": PlanSettings(
        limits=(LimitSettings(name="rps", kind="requests", rate=40, period=timedelta(seconds=1)),)
    ),
    "metered": PlanSettings(
        limits=(
            LimitSettings(
                name="cps", kind="credits", rate=200, period=timedelta(seconds=1), burst=60
            ),
        ),
        refill=RefillSettings(credits=80, chat_messages=8, every=timedelta(seconds=3)),
    ),
    "paid": PlanSettings(bypass=True),
    "demo": PlanSettings(bypass=True),
    # The tree's levels: no limit, no refill, so that the root's credits are
    # its pool less what the paths charged.
    "pool": PlanSettings(),
}


def sim_settings(redis_url: str, database_url: str, **more: Any) -> Settings:
    return Settings(
        redis_url=redis_url,
        key_prefix="sim",
        free_credits=120,
        free_chat_messages=15,
        plans=PLANS,
        reservation_ttl_min=timedelta(seconds=1),
        # Short, so that a stall turns calls in flight into timeouts quickly.
        redis_socket_timeout=timedelta(milliseconds=400),
        redis_connect_timeout=timedelta(milliseconds=400),
        database_url=database_url,
        pg_schema=SCHEMA,
        sync_interval=timedelta(milliseconds=50),
        sync_claim_idle=timedelta(seconds=1),
        sync_batch_size=400,
        sync_retry_max=timedelta(milliseconds=500),
        **more,
    )


@dataclass
class Hold:
    """A reservation made by the client process that was killed."""

    account: str
    id: str
    amount: int
    deadline_ms: int


@dataclass(frozen=True)
class Loss:
    """Redis restarted without its data, or a failover that may have lost the newest writes."""

    server_ms: int  # Redis time just before
    monotonic: float  # this process's clock, to age what the calls acknowledged
    synced: dict[str, int]  # last sequence number PostgreSQL held per account, just after
    kind: str = "restart"  # the fault that caused it
    partitions: frozenset[int] | None = None  # those it could take; None: every one

    def takes(self, partition: int) -> bool:
        return self.partitions is None or partition in self.partitions


@dataclass(kw_only=True)
class Ground:
    """What every mode has: PostgreSQL, the syncer processes, the killed clients' holds."""

    postgres: EmbeddedPostgres
    settings: Settings  # the application's
    direct: Settings  # the syncers' and the checks'
    syncers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    holds: list[Hold] = field(default_factory=list)
    epoch: int = 0  # how many losses (see Loss) so far
    losses: list[Loss] = field(default_factory=list)
    _serial: int = 0

    # -- processes -------------------------------------------------------------

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.properties.sim.procs", *args]

    def spawn_syncer(self, die_at: str | None = None) -> str:
        self._serial += 1
        name = f"syncer-{self._serial}"
        args = [self.direct.model_dump_json(context=REVEAL), name] + ([die_at] if die_at else [])
        self.syncers[name] = subprocess.Popen(
            self._python("syncer", *args), cwd=REPO, stdout=subprocess.DEVNULL
        )
        return name

    def kill_syncer(self, name: str) -> None:
        process = self.syncers.pop(name)
        process.kill()
        process.wait()

    def reap_syncers(self) -> int:
        """Forgets syncers that died by themselves (at their fault point); returns how many."""
        dead = [name for name, process in self.syncers.items() if process.poll() is not None]
        for name in dead:
            del self.syncers[name]
        return len(dead)

    def client_with_holds(self, accounts: list[str]) -> list[Hold]:
        """Starts a client that reserves on ``accounts``, and SIGKILLs it once it holds them."""
        process = subprocess.Popen(
            self._python(
                "holder", self.settings.model_dump_json(context=REVEAL), str(HOLD_TTL_S), *accounts
            ),
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        holds = []
        with process.stdout:
            for raw in process.stdout:
                line = raw.decode().strip()
                if line == "ready":
                    break
                fields: dict[str, Any] = json.loads(line)
                if "id" in fields:
                    holds.append(Hold(**fields))
            process.kill()
            process.wait()
        self.holds += holds
        return holds

    # -- faults ----------------------------------------------------------------

    def postgres_stopped_then_started(self, down_s: float) -> None:
        self.postgres.stop()
        time.sleep(down_s)
        self.postgres.start()

    # -- reading state ---------------------------------------------------------

    def persisted_seqs(self) -> dict[str, int]:
        with psycopg.connect(self.postgres.url, autocommit=True) as conn:
            rows = conn.execute(f'SELECT account, last_seq FROM "{SCHEMA}".accounts').fetchall()
        return dict(rows)


@dataclass(kw_only=True)
class World(Ground):
    """Redis (AOF, fsync always) behind a stallable proxy, PostgreSQL, and syncer processes."""

    redis: EmbeddedRedis
    proxy: NetProxy
    admin: redis.Redis
    # settings: through the proxy; direct: straight to Redis.

    @classmethod
    def start(cls, syncers: int = 2) -> World:
        # fsync always: a SIGKILLed Redis keeps every write it acknowledged.
        server = EmbeddedRedis(appendonly=True, extra_args=["--appendfsync", "always"]).start()
        proxy = NetProxy(server.port).start()
        postgres = EmbeddedPostgres().start()
        app = sim_settings(f"redis://127.0.0.1:{proxy.port}/0", postgres.url)
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            migrate(conn, SCHEMA)
        world = cls(
            redis=server,
            proxy=proxy,
            postgres=postgres,
            settings=app,
            direct=app.model_copy(update={"redis_url": server.url}),
            admin=redis.Redis.from_url(server.url, socket_timeout=5),
        )
        for _ in range(syncers):
            world.spawn_syncer()
        return world

    def close(self) -> None:
        for process in self.syncers.values():
            process.kill()
            process.wait()
        self.admin.close()
        self.proxy.close()
        self.redis.stop()
        self.postgres.close()

    def checks_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    # -- faults ----------------------------------------------------------------

    def redis_killed_then_restarted(self, *, lose_everything: bool) -> None:
        if lose_everything:
            loss_ms, loss_at = self.server_ms(), time.monotonic()
        self.redis.kill()
        if lose_everything:
            self.epoch += 1
            self.losses.append(Loss(loss_ms, loss_at, self.persisted_seqs()))
            for child in self.redis.data_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                elif child.suffix != ".log":
                    child.unlink()
        time.sleep(0.2)
        self.redis.restart()

    # -- reading state ---------------------------------------------------------

    def server_ms(self) -> int:
        seconds, micros = self.admin.time()
        return int(seconds) * 1000 + int(micros) // 1000
