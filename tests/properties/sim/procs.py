"""Processes the simulation kills: syncers, and a client holding reservations.

``python -m tests.properties.sim.procs syncer SETTINGS_JSON NAME [DIE_AT]`` runs a
syncer on its APScheduler job until killed; with ``DIE_AT`` (``before_commit``
or ``after_commit``) it kills itself with SIGKILL at that point of its first
batch. ``python -m tests.properties.sim.procs holder SETTINGS_JSON TTL_S ACCOUNT...``
reserves on each account, prints one JSON line per reservation, then
``ready``, and waits to be killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid

from redcredit import RedCredit, RedCreditError, Settings
from redcredit.ledger.syncer import Syncer


def _die_at(stage: str | None):  # type: ignore[no-untyped-def]
    def hook(at: str) -> None:
        if at == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def run_syncer(settings: Settings, name: str, die_at: str | None) -> None:
    syncer = Syncer(settings, consumer=name, fault_hook=_die_at(die_at))
    with syncer.running():
        while True:
            time.sleep(3600)


def run_holder(settings: Settings, ttl_s: int, accounts: list[str]) -> None:
    run = uuid.uuid4().hex
    with RedCredit(settings=settings) as rc:
        for i, account in enumerate(accounts):
            try:
                held = rc.reserve(account, 5 + i % 7, ttl=ttl_s, idempotency_key=f"{run}-{i}")
            except RedCreditError as exc:  # a fault may be under way: holding fewer is fine
                print(json.dumps({"account": account, "error": type(exc).__name__}), flush=True)
                continue
            line = {"account": account, "id": held.id, "amount": held.amount}
            print(json.dumps(line | {"deadline_ms": held.deadline_ms}), flush=True)
        print("ready", flush=True)
        while True:
            time.sleep(3600)


def main(argv: list[str]) -> None:
    kind, settings_json, *rest = argv
    settings = Settings.model_validate_json(settings_json)
    if kind == "syncer":
        run_syncer(settings, rest[0], rest[1] if len(rest) > 1 else None)
    elif kind == "holder":
        run_holder(settings, int(rest[0]), rest[1:])
    else:
        raise SystemExit(f"unknown process kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
