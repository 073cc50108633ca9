"""The faults, and a seeded schedule of them."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable

from tests.properties.sim.world import HOLD_TTL_S, Ground, World

KINDS = (
    "redis_sigkill_aof_restart",
    "redis_restart_empty",
    "script_flush",
    "postgres_stop_start",
    "syncer_sigkill",
    "syncer_dies_before_commit",
    "syncer_dies_after_commit",
    "client_killed_holding_reservations",
    "network_stall",
)
HOLDER_ACCOUNTS = [f"holder-{i}" for i in range(6)]  # touched by the killed clients only


def schedule(
    seed: int, duration_s: float, kinds: tuple[str, ...] = KINDS
) -> list[tuple[float, str]]:
    """Every kind at least once, then more at random, at seeded moments of the run.

    The first and last seconds are left alone, so that the load is running
    when the first fault lands and the servers are settled before the checks.
    """
    rng = random.Random(seed)
    rounds = max(1, int(duration_s // (4 * len(kinds))))
    plan = [kind for _ in range(rounds) for kind in kinds]
    rng.shuffle(plan)
    start, end = 1.5, max(duration_s - 3.0, 2.0)
    gap = (end - start) / len(plan)
    return [(start + i * gap + rng.uniform(0, gap * 0.5), kind) for i, kind in enumerate(plan)]


class Injector:
    """Does each fault of a schedule at its moment; those of the single server here."""

    def __init__(self, world: Ground, seed: int) -> None:
        self.world = world
        self.rng = random.Random(seed ^ 0x5EED)
        self.done: Counter[str] = Counter()
        self.log: list[str] = []

    async def run(self, plan: list[tuple[float, str]], started: float) -> None:
        for at, kind in plan:
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            began = time.monotonic()
            await asyncio.to_thread(self.actions()[kind])
            self.done[kind] += 1
            self.log.append(f"{at:7.2f}s {kind} ({time.monotonic() - began:.2f}s)")

    def actions(self) -> dict[str, Callable[[], None]]:
        world = self.world
        assert isinstance(world, World)
        return {
            "redis_sigkill_aof_restart": lambda: world.redis_killed_then_restarted(
                lose_everything=False
            ),
            "redis_restart_empty": lambda: world.redis_killed_then_restarted(lose_everything=True),
            "script_flush": lambda: world.admin.script_flush(),
            **self.common_actions(),
            "network_stall": self._network_stall,
        }

    def common_actions(self) -> dict[str, Callable[[], None]]:
        """The faults that need no particular Redis: PostgreSQL, syncers, a client."""
        world = self.world
        return {
            "postgres_stop_start": lambda: world.postgres_stopped_then_started(
                self.rng.uniform(0.3, 1.5)
            ),
            "syncer_sigkill": self._syncer_sigkill,
            "syncer_dies_before_commit": lambda: self._syncer_dies("before_commit"),
            "syncer_dies_after_commit": lambda: self._syncer_dies("after_commit"),
            "client_killed_holding_reservations": lambda: world.client_with_holds(
                self.rng.sample(HOLDER_ACCOUNTS, 3)
            ),
        }

    def _syncer_sigkill(self) -> None:
        # At a random moment of its work: mid-read, mid-batch or mid-acknowledgement.
        victim = self.rng.choice(sorted(self.world.syncers))
        time.sleep(self.rng.uniform(0, 0.1))
        self.world.kill_syncer(victim)
        self.world.spawn_syncer()

    def _syncer_dies(self, stage: str) -> None:
        name = self.world.spawn_syncer(die_at=stage)
        until = time.monotonic() + 10
        while name in self.world.syncers and time.monotonic() < until:
            self.world.reap_syncers()
            time.sleep(0.05)
        if name in self.world.syncers:  # no batch came its way in time
            self.world.kill_syncer(name)

    def _network_stall(self) -> None:
        assert isinstance(self.world, World)
        self.world.proxy.pause()
        time.sleep(self.rng.uniform(0.5, 1.5))  # past the client's 0.4 s socket timeout
        self.world.proxy.resume()


def lease_margin_s() -> float:
    return HOLD_TTL_S + 3.5  # the longest lease of the workload (3 s) or the holders', and some
