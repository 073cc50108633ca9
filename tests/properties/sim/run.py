"""One simulation run: load and faults, then the drain, the checks and the report."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

from redcredit import AsyncRedCredit, RedCreditError
from redcredit.core.keys import KeySpace
from redcredit.ledger.syncer import Syncer
from tests.properties.sim import checks, trees
from tests.properties.sim.cluster import (
    CLUSTER_KINDS,
    FAILOVER_KINDS,
    ClusterInjector,
    ClusterWorld,
)
from tests.properties.sim.faults import (
    HOLDER_ACCOUNTS,
    KINDS,
    Injector,
    lease_margin_s,
    schedule,
)
from tests.properties.sim.workload import Clients
from tests.properties.sim.world import World


@dataclass
class Report:
    seed: int
    duration_s: float
    faults: dict[str, int] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    fault_log: list[str] = field(default_factory=list)
    cluster: bool = False

    def text(self) -> str:
        on = " on a cluster (3 primaries, 3 replicas)" if self.cluster else ""
        lines = [f"simulation seed={self.seed} duration={self.duration_s:.0f}s{on}"]
        lines += [f"  {name}: {value}" for name, value in self.figures.items()]
        lines.append(f"  faults injected: {sum(self.faults.values())}")
        lines += [f"    {kind}: {n}" for kind, n in sorted(self.faults.items())]
        if self.violations:
            lines.append(f"  VIOLATIONS ({len(self.violations)}):")
            lines += [f"    {v}" for v in self.violations]
        else:
            lines.append("  every invariant held")
        mode = " --cluster" if self.cluster else ""
        lines.append(
            f"  reproduce: python -m tests.properties.sim{mode} --seed {self.seed} --duration {self.duration_s:.0f}"
        )
        return "\n".join(lines)


def simulate(
    seed: int, duration_s: float, *, workers: int = 48, accounts: int = 40, cluster: bool = False
) -> Report:
    """One run; ``cluster``: on a Redis Cluster with replicas, with the faults of a cluster."""
    world: World | ClusterWorld = ClusterWorld.start() if cluster else World.start()
    try:
        return asyncio.run(_simulate(world, seed, duration_s, workers, accounts))
    finally:
        world.close()


async def _simulate(
    world: World | ClusterWorld, seed: int, duration_s: float, workers: int, accounts: int
) -> Report:
    report = Report(seed, duration_s, cluster=isinstance(world, ClusterWorld))
    names = [f"acct-{i}" for i in range(accounts)]
    injector: Injector
    if isinstance(world, ClusterWorld):
        injector, kinds = ClusterInjector(world, seed, names), CLUSTER_KINDS
    else:
        injector, kinds = Injector(world, seed), KINDS
    async with AsyncRedCredit(settings=world.settings) as arc:
        clients = Clients(arc, names, seed, epoch=lambda: world.epoch)
        await clients.set_up_tree()
        # In PostgreSQL before the first fault: a Redis lost with everything
        # then reloads the tree rather than forgetting it.
        with Syncer(world.direct) as syncer:
            await asyncio.to_thread(syncer.drain, timeout_s=30)
        load = asyncio.create_task(clients.run(workers))
        started = time.monotonic()
        await injector.run(schedule(seed, duration_s, kinds), started)
        await asyncio.sleep(max(0.0, started + duration_s - time.monotonic()))
        clients.stopping.set()
        await load
        elapsed = time.monotonic() - started
        # Every lease of the run has passed its deadline once this is over; a
        # touch then journals the lapse of each hold nobody closed.
        await asyncio.sleep(lease_margin_s())
        world.reap_syncers()
        if not world.syncers:
            world.spawn_syncer()
        for account in names + HOLDER_ACCOUNTS:
            balance = await _settled_balance(arc, account)
            if balance is not None and balance.held:
                report.violations.append(f"leases: {account} still holds {balance.held}")
        tree: dict[str, Any] = {}
        for scope in trees.every_level():
            tree[scope.account] = balance = await _settled_balance(arc, scope)
            if balance is not None and balance.held:
                report.violations.append(f"leases: {scope} still holds {balance.held}")
    await asyncio.to_thread(_drain_and_check, world, clients, injector, report, tree)
    report.faults = dict(injector.done)
    report.fault_log = injector.log
    report.figures = {"load seconds": round(elapsed, 1), **report.figures}
    return report


async def _settled_balance(arc: AsyncRedCredit, account: str) -> Any:
    for _ in range(50):
        try:
            return await arc.balance(account)
        except RedCreditError:
            await asyncio.sleep(0.1)
    return None


def _drain_and_check(
    world: World | ClusterWorld,
    clients: Clients,
    injector: Injector,
    report: Report,
    tree: dict[str, Any],
) -> None:
    with Syncer(world.direct) as syncer:
        lag = syncer.drain(timeout_s=120)
    for name in list(world.syncers):
        world.kill_syncer(name)
    findings = checks.Findings()
    findings.add("journal drained", [] if lag.caught_up else [f"{lag.entries} entries left"])
    # A failover loses only what its primary had not replicated: the holds
    # before it live on; a total loss ends them all.
    loss_times = [loss.server_ms for loss in world.losses if loss.partitions is None]
    partition_of = KeySpace(world.direct.versioned_prefix, world.direct.partitions).partition
    record = clients.record
    findings.add("no exception outside RedCreditError", record.escaped)
    findings.add("no balance read showed available < 0", record.oversold)
    client = world.checks_client()
    with psycopg.connect(world.postgres.url, autocommit=True) as conn:
        ledger = checks.read_ledger(conn)
        findings.add("ledger: no gap, no duplicate", checks.sequences_without_gaps(ledger))
        findings.add("conservation in PostgreSQL", checks.conserved(ledger, conn))
        findings.add("Redis equals PostgreSQL", checks.same_in_redis(ledger, client, world.direct))
        findings.add("never oversold (ledger replay)", checks.never_oversold(ledger, loss_times))
        problems, lost = checks.exactly_once(record.calls, ledger, world.losses, partition_of)
        findings.add("every keyed call applied once", problems)
        findings.add(
            "holds of killed clients lapsed at their deadline",
            checks.holds_lapsed(world.holds, ledger, world.losses, partition_of),
        )
        if isinstance(world, ClusterWorld):
            findings.add("no history forked (diverged_entries empty)", checks.never_forked(conn))
        findings.add("reconcile reports no drift", checks.no_drift(world.direct, client, conn))
        findings.add(
            "every bucket's ledger deltas sum to its remaining", trees.buckets_add_up(conn)
        )
        tree_rows = trees.read_tree_rows(conn)
        findings.add("no level of the tree below zero at the end", trees.levels_in_bounds(tree))
        findings.add("the capped user's windows within its cap", trees.cap_kept(tree_rows))
        findings.add(
            "the root's credits = granted - charged at it",
            trees.root_explained(tree_rows, tree.get(trees.ROOT)),
        )
        findings.add("every path call journaled at its own account", trees.paths_whole(tree_rows))
        doubled = checks.applied_twice(ledger)
    client.close()
    lost_ages = [age for _, age, _ in lost]
    report.figures.update(checks.tally(record.calls))
    report.figures.update(
        {
            "balance reads": record.balance_reads,
            "accounts": len(ledger),
            "ledger entries persisted": sum(len(rows) for rows in ledger.values()),
            "holds of killed clients": len(world.holds),
            "buckets expired, started, voided (ledger entries)": [
                sum(row.op == op for rows in ledger.values() for row in rows)
                for op in ("expire", "effective", "void")
            ],
        }
    )
    if isinstance(world, ClusterWorld):
        report.figures.update(_failover_figures(world, lost, len(doubled), findings))
    else:
        report.figures.update(
            {
                "Redis total losses": len(world.losses),
                "acknowledged calls lost in the unsynced window of a total loss": len(lost_ages),
                "the oldest of them, answered before its loss (ms)": round(
                    max(lost_ages, default=0) * 1000
                ),
            }
        )
    report.figures.update(findings.figures)
    report.violations += findings.violations


def _failover_figures(
    world: ClusterWorld, lost: list[tuple[int, float, str]], doubled: int, findings: checks.Findings
) -> dict[str, Any]:
    per_loss = Counter(index for index, _, _ in lost)
    figures: dict[str, Any] = {}
    for kind in FAILOVER_KINDS:
        counts = [per_loss[i] for i, loss in enumerate(world.losses) if loss.kind == kind]
        figures[f"acknowledged calls lost, per {kind}"] = counts
    figures["the oldest of them, answered before its failover (ms)"] = round(
        max((age for _, age, _ in lost), default=0) * 1000
    )
    figures["lagging failovers no election settled (TAKEOVER)"] = world.cluster.takeovers
    figures["keys applied more than once"] = doubled
    # CLUSTER FAILOVER hands over only once the replica has every write.
    graceful = figures["acknowledged calls lost, per cluster_failover"]
    findings.add(
        "a graceful failover lost no acknowledged call",
        [
            f"{n} lost in failover {i + 1}: "
            + str(Counter(what for index, _, what in lost if index == first))
            for i, n in enumerate(graceful)
            if n
            for first in [_first_of(world, "cluster_failover", i)]
        ],
    )
    return figures


def _first_of(world: ClusterWorld, kind: str, nth: int) -> int:
    """The index among all losses of the ``nth`` loss of ``kind``."""
    return [i for i, loss in enumerate(world.losses) if loss.kind == kind][nth]
