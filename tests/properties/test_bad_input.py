"""Bad input gets a typed error before Redis is touched, and changes nothing."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redcredit import (
    BackendUnavailable,
    InvalidInput,
    RedCredit,
    RedCreditError,
    ReservationRef,
    Settings,
)
from redcredit.servers.spawn import free_port
from tests.support.helpers import snapshot

BAD_AMOUNTS = [
    -1,
    1.0,
    2.5,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    "5",
    None,
    Decimal(3),
    2**53 + 1,
    10**30,
    b"5",
    [5],
]
BAD_IDS = [
    "",
    " padded",
    "trail ",
    "new\nline",
    "nul\x00",
    "zero\u200bwidth",
    "x" * 257,
    "y" * 10_000,
    "{" * 10_000,
    "é" * 129,
    "e\u0301",
    5,
    None,
    b"bytes",
    "bidi\u202e",
]


@pytest.fixture
def unchanged(rc: RedCredit, redis_client, prefix: str):
    rc.spend("victim", cost=1)
    rc.reserve("victim", 10)
    before = snapshot(redis_client, prefix)
    yield
    assert snapshot(redis_client, prefix) == before


def _calls(rc: RedCredit, amount: object) -> list:
    ref = ReservationRef("victim", "0" * 32)
    return [
        lambda: rc.spend("victim", cost=amount),
        lambda: rc.chat_turn("victim", cost=amount),
        lambda: rc.spend_chat_message("victim", messages=amount),
        lambda: rc.grant("victim", amount),
        lambda: rc.grant("victim", chat_messages=amount),
        lambda: rc.reserve("victim", amount),
        lambda: rc.settle(ref, amount),
        lambda: rc.spend("victim", "document", units=amount),
    ]


@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
def test_bad_amounts(rc: RedCredit, unchanged: None, amount: object) -> None:
    for call in _calls(rc, amount):
        with pytest.raises(InvalidInput) as refused:
            call()
        assert isinstance(refused.value, ValueError) and isinstance(refused.value, RedCreditError)
        assert len(str(refused.value)) < 400


@pytest.mark.parametrize("account", BAD_IDS, ids=repr)
def test_bad_account_ids(rc: RedCredit, unchanged: None, account: object) -> None:
    for call in (
        lambda: rc.spend(account, cost=1),  # type: ignore[arg-type]
        lambda: rc.grant(account, 1),  # type: ignore[arg-type]
        lambda: rc.balance(account),  # type: ignore[arg-type]
        lambda: rc.set_plan(account, "paid"),  # type: ignore[arg-type]
        lambda: rc.reserve(account, 1),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput):
            call()


@pytest.mark.parametrize("key", ["", "x" * 201, "a\nb", "\x00", 5, b"k", " lead"], ids=repr)
def test_bad_idempotency_keys(rc: RedCredit, unchanged: None, key: object) -> None:
    with pytest.raises(InvalidInput):
        rc.spend("victim", cost=1, idempotency_key=key)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "ttl", [0, -5, 1.5, math.nan, True, timedelta(days=400), timedelta(0), "60", 10**12], ids=repr
)
def test_bad_ttls(rc: RedCredit, unchanged: None, ttl: object) -> None:
    with pytest.raises(InvalidInput):
        rc.reserve("victim", 1, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        rc.extend(ReservationRef("victim", "0" * 32), ttl=ttl)  # type: ignore[arg-type]


def test_bad_flags_and_names(rc: RedCredit, unchanged: None) -> None:
    ref = ReservationRef("victim", "0" * 32)
    with pytest.raises(InvalidInput):
        rc.settle(ref, 1, allow_late=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        rc.reserve("victim", 1, feature="bad feature")
    with pytest.raises(InvalidInput):
        rc.release(ReservationRef("victim", "G" * 32))
    with pytest.raises(InvalidInput):
        rc.spend("victim", cost=1, units=3)


@pytest.fixture(scope="module")
def unreachable() -> Iterator[RedCredit]:
    # Nothing listens here: any I/O would fail with BackendUnavailable, so an
    # InvalidInput proves the call was refused before touching the network.
    client = RedCredit(settings=Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    yield client
    client.close()


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.floats(),
        st.integers(max_value=-1),
        st.integers(min_value=2**53 + 1),
        st.booleans(),
        st.text(),
        st.none(),
        st.binary(),
        st.decimals(allow_nan=True),
    )
)
def test_any_bad_amount_is_refused_before_io(unreachable: RedCredit, value: object) -> None:
    for call in _calls(unreachable, value):
        with pytest.raises(InvalidInput):
            call()


@settings(max_examples=200, deadline=None)
@given(account=st.text(min_size=0, max_size=300))
def test_any_account_id_is_refused_or_accepted_before_io(
    unreachable: RedCredit, account: str
) -> None:
    # Valid ids reach the network (and fail there); invalid ones never do.
    with pytest.raises((InvalidInput, BackendUnavailable)) as outcome:
        unreachable.spend(account, cost=1)
    valid = (
        account != ""
        and len(account.encode()) <= 256
        and account == account.strip()
        and unicodedata.is_normalized("NFC", account)
        and all(
            unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
            for c in account
        )
    )
    assert isinstance(outcome.value, BackendUnavailable) == valid
