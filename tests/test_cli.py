"""The ``redcredit`` command, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redcredit.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded-redis", "given-url"])
def test_demo_plays_the_whole_scenario(embedded: bool, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_")}
    if not embedded:
        env["REDCREDIT_REDIS_URL"] = redis_url
    done = _run("demo", env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert ("starting an embedded Redis" in out) == embedded
    assert "refused: InsufficientCredits" in out
    assert "granted, now 30 (replayed)" in out
    assert "ok, unlimited (usage journaled)" in out
    assert "settled: charged 7" in out
    lapse = next(line for line in out.splitlines() if "deadline passes" in line)
    assert lapse.split()[-1] == "0"  # nothing held any more
    assert "Journal: 17 entries" in out


def test_bad_settings_are_a_clear_error() -> None:
    env = {**os.environ, "REDCREDIT_PARTITIONS": "three"}
    done = _run("demo", env=env)
    assert done.returncode == 2
    assert "partitions" in done.stderr and "Traceback" not in done.stderr
