"""The fault-injecting simulation, short and seeded (``python -m tests.properties.sim`` runs it longer)."""

from __future__ import annotations

import os

from tests.conftest import _require_postgres_binaries, _require_server_binary
from tests.properties.sim.faults import KINDS
from tests.properties.sim.run import simulate

# A fixed seed, so that a red run here is reproduced by the command it prints.
SEED = int(os.environ.get("REDCREDIT_SIM_SEED", "20261124"))
DURATION_S = float(os.environ.get("REDCREDIT_SIM_SECONDS", "45"))


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
