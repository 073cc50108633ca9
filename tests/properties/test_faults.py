"""The fault-injecting simulation, short and seeded (``python -m tests.properties.sim`` runs it longer)."""

from __future__ import annotations

import os

from tests.conftest import _require_postgres_binaries, _require_server_binary
from tests.properties.sim.cluster import CLUSTER_KINDS
from tests.properties.sim.faults import KINDS
from tests.properties.sim.run import simulate

# A fixed seed, so that a red run here is reproduced by the command it prints.
SEED = int(os.environ.get("REDCREDIT_SIM_SEED", "20261124"))
DURATION_S = float(os.environ.get("REDCREDIT_SIM_SECONDS", "45"))
# On a cluster: one fault of each kind, about 2 s apart.
CLUSTER_DURATION_S = float(os.environ.get("REDCREDIT_SIM_CLUSTER_SECONDS", "25"))


def test_every_invariant_holds_under_load_and_faults() -> None:
    _require_server_binary("the simulation")
    _require_postgres_binaries("the simulation")
    report = simulate(SEED, DURATION_S)
    print(report.text())
    assert not report.violations, report.text()
    # The run did what it claims: every kind of fault, real load, real retries.
    assert set(report.faults) == set(KINDS), report.faults
    figures = report.figures
    assert figures["calls ok"] > 10_000
    assert figures["calls refused (an answer)"] > 0
    assert figures["calls that hit a fault and were retried"] > 0
    assert figures["retries answered from the idempotency record"] > 0
    assert figures["ledger entries persisted"] > 10_000
    assert figures["holds of killed clients"] > 0


def test_every_invariant_holds_on_a_cluster_under_load_and_failovers() -> None:
    _require_server_binary("the cluster simulation")
    _require_postgres_binaries("the cluster simulation")
    report = simulate(SEED, CLUSTER_DURATION_S, cluster=True)
    print(report.text())
    assert not report.violations, report.text()
    assert set(report.faults) == set(CLUSTER_KINDS), report.faults
    figures = report.figures
    assert figures["calls ok"] > 10_000
    assert figures["calls that hit a fault and were retried"] > 0
    assert figures["ledger entries persisted"] > 10_000
    assert figures["holds of killed clients"] > 0
    assert figures["keys applied more than once"] == 0
    # The lagging failover's window was real: acknowledged calls went with it.
    assert sum(figures["acknowledged calls lost, per lagging_failover"]) > 0
    assert figures["acknowledged calls lost, per cluster_failover"] == [0]
