"""Fuzzing the argument checks and the key builder: accepted well formed, or refused typed.

The targets live in ``tests/properties/fuzz_targets.py``; here hypothesis drives them for
a few seconds, from raw bytes (the same decoder atheris uses) and from
structured values. A longer coverage-guided run: ``python -m tests.properties.fuzz_targets``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, target
from hypothesis import strategies as st

from redcredit import InvalidInput
from redcredit import validation as v
from redcredit.core.keys import KeySpace
from tests.properties.fuzz_targets import (
    BOUNDARIES,
    INTERESTING,
    MAX_PARTITIONS,
    MIN_PARTITIONS,
    BadRepr,
    Level,
    Name,
    check_keys,
    check_value,
    fuzz_one,
)

ROOT = Path(__file__).resolve().parents[2]
# No example database: with target() it would write a file per improvement,
# several times slower, to keep a corpus these random runs do not need.

# Any code point, lone surrogates included (st.text() leaves those out).
ANY_CHAR = st.integers(min_value=0, max_value=0x10FFFF).map(chr)
TEXTS = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(INTERESTING), max_size=40),
    st.text(alphabet=ANY_CHAR, max_size=40),
    # Around the byte limits, in characters of one to four UTF-8 bytes.
    st.tuples(st.sampled_from("x\u00e9\u20ac\U0001f600"), st.integers(40, 270)).map(
        lambda pair: pair[0] * pair[1]
    ),
)
VALUES = st.one_of(
    st.integers(),
    st.sampled_from(BOUNDARIES).flatmap(lambda b: st.integers(-b - 2, b + 2)),
    st.integers(min_value=2**60, max_value=2**70),
    st.floats(),
    st.decimals(),
    st.fractions(),
    st.booleans(),
    st.none(),
    st.binary(max_size=40),
    TEXTS,
    st.timedeltas(),
    st.builds(Name, TEXTS),
    st.builds(Level, st.integers()),
    st.lists(st.integers(), max_size=2),
    st.complex_numbers(),
    st.just(10**5000),
    st.builds(BadRepr),
)


@settings(
    max_examples=4000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.binary(max_size=400))
@example(data=b"")
def test_fuzz_target_on_raw_bytes(data: bytes) -> None:
    fuzz_one(data)


@settings(max_examples=3000, deadline=None, database=None)
@given(value=VALUES)
@example(value="\U000e0041" * 300)
@example(value=timedelta.max)
@example(value=Level(-5))
def test_every_check_accepts_well_formed_or_refuses_typed(value: object) -> None:
    accepted = check_value(value)
    if isinstance(value, str):
        # Steer text towards the 256-byte edge of account ids, where off-by-ones hide.
        size = len(value.encode("utf-8", "surrogatepass"))
        target(-abs(size - v.MAX_ACCOUNT_ID_BYTES), label="distance to the id byte limit")
    target(float(accepted), label="checks accepting the value")


def _valid(check: Callable[[object], str | None], values: list[str]) -> list[str]:
    kept = []
    for value in values:
        try:
            checked = check(value)
        except InvalidInput:
            continue
        if checked is not None:
            kept.append(checked)
    return kept


@settings(max_examples=800, deadline=None, database=None)
@given(
    prefix=st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True),
    partitions=st.integers(MIN_PARTITIONS, MAX_PARTITIONS),
    accounts=st.lists(TEXTS, max_size=12),
    keys=st.lists(TEXTS, max_size=3),
)
def test_keys_are_tagged_and_never_shared(
    prefix: str, partitions: int, accounts: list[str], keys: list[str]
) -> None:
    # Each id also with a suffix that mimics the key layout, the likeliest collision.
    ids = sorted(set(_valid(v.check_account_id, accounts + [a + "}:h:" + a for a in accounts])))
    check_keys(prefix, partitions, ids, _valid(v.check_idempotency_key, keys), ["0" * 32])
    if ids:
        # Accounts sharing a partition share a tag: only the rest of the name keeps them apart.
        crowd = Counter(map(KeySpace(f"{prefix}:v1", partitions).partition, ids))
        target(float(max(crowd.values())), label="accounts in the busiest partition")


@pytest.mark.parametrize(
    "accounts",
    [
        ["a", "a}:a:a", "a:h:a", "a:r:a", "a:i:1:a"],
        ["{0}", "{1}", "}", "{", "{}", "a{0}b"],
        ["1:a", "a", "3:1:a", "a:" + "0" * 32],
        ["*", "?", "[a-z]", "\\*", "a*", "rc:v1:*"],
        ["admin", "\u0430dmin", "\uff41dmin", "Admin", "admin\u00a0x"],
        ["x" * 256, "\u00e9" * 128, "\U0001f600" * 64],
    ],
    ids=["layout", "braces", "lengths", "globs", "confusables", "byte-limit"],
)
def test_ids_that_mimic_key_names_get_keys_of_their_own(accounts: list[str]) -> None:
    ids = [v.check_account_id(account) for account in accounts]
    # Few partitions, so that most of these share a tag.
    owners = check_keys("rc", MIN_PARTITIONS, ids, ["1:a", "a:" + "0" * 32, "}"], ["0" * 32])
    hashes = {key for key, owner in owners.items() if owner[0] == "hash"}
    assert len(hashes) == len(ids)


def _run_entry_point(*args: str, hide_atheris: bool = False) -> subprocess.CompletedProcess[str]:
    hide = "sys.modules['atheris'] = None; " if hide_atheris else ""
    code = (
        f"import runpy, sys; {hide}sys.argv = ['fuzz_targets', *sys.argv[1:]]; "
        "runpy.run_module('tests.properties.fuzz_targets', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def test_entry_point_without_atheris_says_so_and_succeeds() -> None:
    done = _run_entry_point("-runs=10", hide_atheris=True)
    assert done.returncode == 0, done.stderr
    assert "atheris is not installed" in done.stderr
    assert "Traceback" not in done.stderr


def test_atheris_runs_the_target_briefly() -> None:
    pytest.importorskip("atheris")
    done = _run_entry_point("-runs=3000", "-seed=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Done 3000 runs" in done.stderr
