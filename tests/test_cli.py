"""The ``redcredit`` command, run as a user would."""

from __future__ import annotations

import os

import pytest

from tests.cli.running import clean_env, run_cli


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded-servers", "given-urls"])
def test_demo_plays_the_whole_scenario(
    embedded: bool, redis_url: str, postgres_url: str, pg_schema: str
) -> None:
    env = clean_env()
    if not embedded:
        env["REDCREDIT_REDIS_URL"] = redis_url
        env["REDCREDIT_DATABASE_URL"] = postgres_url
        env["REDCREDIT_PG_SCHEMA"] = pg_schema
    done = run_cli("demo", "--no-serve", env=env)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr
    out = done.stdout
    assert ("started an embedded Redis" in out) == embedded
    assert ("started an embedded PostgreSQL" in out) == embedded
    assert "refused: InsufficientCredits" in out
    assert "granted, now 30 (replayed)" in out
    assert "ok, unlimited (usage journaled)" in out
    assert "settled: charged 7" in out
    lapse = next(line for line in out.splitlines() if "deadline passes" in line)
    assert lapse.split()[-1] == "0"  # nothing held any more
    # The syncer's lag falls to zero, and the ledger holds every entry.
    lag_rows = out.split("its lag falls to zero:")[1].split("PostgreSQL ledger")[0]
    waiting = [int(line.split()[1]) for line in lag_rows.strip().splitlines()[1:]]
    assert waiting[0] >= 5000 and waiting[-1] == 0
    assert "(5431 rows in all)" in out
    ledger = out.split("PostgreSQL ledger")[1].splitlines()
    assert [line.split()[1] for line in ledger[3:13]] == [
        "open", "spend", "spend", "spend", "spend", "grant", "turn", "spend", "reserve", "settle",
    ]  # fmt: skip


def test_bad_settings_are_a_clear_error() -> None:
    env = {**os.environ, "REDCREDIT_PARTITIONS": "three"}
    done = run_cli("demo", "--no-serve", env=env)
    assert done.returncode == 2
    assert "partitions" in done.stderr and "Traceback" not in done.stderr
