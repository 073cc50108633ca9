"""Argument checks: what passes comes back normalised, everything else is a typed refusal."""

from __future__ import annotations

import enum
import math
import unicodedata
import uuid
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from redcredit import AccountIdError, InvalidInput, RedCreditError
from redcredit import validation as v

FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


class Level(enum.IntEnum):
    LOW = 3


class Name(str):
    """A str subclass, to check that a plain str comes back."""


def assert_refused(error: pytest.ExceptionInfo[BaseException]) -> None:
    assert isinstance(error.value, InvalidInput)
    assert isinstance(error.value, ValueError)
    assert isinstance(error.value, RedCreditError)
    # Short enough to read, whatever was passed.
    assert len(str(error.value)) < 400


# -- amounts ------------------------------------------------------------------

BAD_AMOUNTS = [
    -1,
    -(2**60),
    2**53 + 1,
    10**30,
    10**5000,  # too many digits for CPython to print at all
    1.0,
    2.5,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    "5",
    "",
    None,
    Decimal(3),
    Fraction(3, 1),
    b"5",
    [5],
    {"amount": 5},
    complex(5, 0),
]


@pytest.mark.parametrize("value", [0, 1, 42, 2**53 - 1, 2**53])
def test_amount_accepts_ints_in_range(value: int) -> None:
    result = v.check_amount(value)
    assert result == value
    assert type(result) is int


def test_amount_turns_int_subclasses_into_plain_ints() -> None:
    result = v.check_amount(Level.LOW)
    assert result == 3
    assert type(result) is int


@pytest.mark.parametrize("value", BAD_AMOUNTS, ids=lambda value: v.short_repr(value)[:40])
def test_amount_refusals(value: object) -> None:
    with pytest.raises(InvalidInput) as error:
        v.check_amount(value, name="credits")
    assert_refused(error)
    assert str(error.value).startswith("credits must be")


def test_amount_messages_say_why() -> None:
    with pytest.raises(InvalidInput, match=r"credits must be an int, not bool True"):
        v.check_amount(True, name="credits")
    with pytest.raises(InvalidInput, match=r"cost must be an int, not float nan"):
        v.check_amount(math.nan, name="cost")
    with pytest.raises(InvalidInput, match=r"amount must be between 0 and 2\*\*53, not -1"):
        v.check_amount(-1)
    with pytest.raises(InvalidInput, match=r"<int of \d+ bits>"):
        v.check_amount(10**5000)


def test_amount_can_refuse_zero() -> None:
    assert v.check_amount(0) == 0
    with pytest.raises(InvalidInput, match="between 1 and 2\\*\\*53"):
        v.check_amount(0, name="messages", allow_zero=False)
    assert v.check_amount(1, allow_zero=False) == 1


@pytest.mark.parametrize("value", [-(2**53), -1, 0, 1, 2**53])
def test_signed_amount_range(value: int) -> None:
    assert v.check_signed_amount(value, name="credits") == value


@pytest.mark.parametrize(
    "value", [-(2**53) - 1, 2**53 + 1, True, False, 1.5, math.nan, "-3", None, Decimal(-3)]
)
def test_signed_amount_refusals(value: object) -> None:
    with pytest.raises(InvalidInput) as error:
        v.check_signed_amount(value, name="credits")
    assert_refused(error)
    assert "credits" in str(error.value)


def test_signed_amount_zero_on_request() -> None:
    with pytest.raises(InvalidInput, match="credits must not be zero"):
        v.check_signed_amount(0, name="credits", allow_zero=False)
    assert v.check_signed_amount(-5, name="credits", allow_zero=False) == -5


@given(st.integers(min_value=0, max_value=v.MAX_AMOUNT))
def test_every_amount_in_range_round_trips(value: int) -> None:
    assert v.check_amount(value) == value


@given(
    st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=v.MAX_AMOUNT + 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(),
        st.none(),
        st.decimals(allow_nan=True),
        st.binary(),
        st.lists(st.integers(), max_size=3),
    )
)
def test_every_refused_amount_is_invalid_input(value: object) -> None:
    with pytest.raises(InvalidInput) as error:
        v.check_amount(value)
    assert_refused(error)


# -- account ids and idempotency keys -------------------------------------------

GOOD_IDS = [
    "a",
    "user-42",
    "user@example.com",
    "org:{acme}:user:*?[x]",  # braces, colons and glob characters cannot escape a key
    "{",
    "}",
    ":",
    "a b",  # inner space
    "José",
    "Ñandú",
    "日本語のユーザー",
    "пользователь",
    "مستخدم",
    "😀 party",
    "x" * 256,
    "é" * 128,  # 256 bytes in UTF-8
]

BAD_IDS = [
    ("", "empty"),
    (" padded", "white space"),
    ("trail ", "white space"),
    ("\u3000wide", "white space"),  # ideographic space
    ("nbsp\u00a0", "white space"),
    ("new\nline", "U+000A"),
    ("tab\there", "U+0009"),
    ("nul\x00", "U+0000"),
    ("del\x7f", "U+007F"),
    ("zero\u200bwidth", "U+200B"),
    ("joiner\u200d", "U+200D"),
    ("bidi\u202eoverride", "U+202E"),
    ("\ufeffbom", "U+FEFF"),
    ("line\u2028sep", "U+2028"),
    ("para\u2029sep", "U+2029"),
    ("lone\ud800surrogate", "U+D800"),
    ("private\ue000use", "U+E000"),
    ("unassigned\u0378", "U+0378"),
    ("x" * 257, "256 bytes"),
    ("é" * 129, "256 bytes"),
    ("y" * 10_000, "256 bytes"),
    ("{" * 10_000, "256 bytes"),
    ("e\u0301", "NFC"),  # e + combining acute: NFC is "é"
    ("\u212b", "NFC"),  # ANGSTROM SIGN: NFC is U+00C5
    ("Cafe\u0301", "NFC"),
]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_account_ids_accepted(value: str) -> None:
    assert v.check_account_id(value) == value


@pytest.mark.parametrize(("value", "reason"), BAD_IDS, ids=lambda value: repr(value)[:30])
def test_account_ids_refused(value: str, reason: str) -> None:
    with pytest.raises(AccountIdError) as error:
        v.check_account_id(value)
    assert_refused(error)
    assert str(error.value).startswith("account id")
    assert reason in str(error.value)


@pytest.mark.parametrize("value", [None, 5, 5.0, b"bytes", ["a"], True])
def test_account_ids_must_be_str(value: object) -> None:
    with pytest.raises(AccountIdError, match="account id must be a str") as error:
        v.check_account_id(value)
    assert_refused(error)


def test_long_values_are_not_echoed_whole() -> None:
    value = "y" * 10_000
    with pytest.raises(AccountIdError) as error:
        v.check_account_id(value)
    message = str(error.value)
    assert "10000 chars" in message
    assert value not in message
    assert len(message) < 200


def test_str_subclass_comes_back_as_str() -> None:
    result = v.check_account_id(Name("user-1"))
    assert result == "user-1"
    assert type(result) is str
    assert type(v.check_account_id(Name("José"))) is str


def test_idempotency_keys() -> None:
    assert v.check_idempotency_key(None) is None
    assert v.check_idempotency_key("payment:pi_123") == "payment:pi_123"
    assert v.check_idempotency_key("k" * 200) == "k" * 200
    with pytest.raises(InvalidInput, match="idempotency_key must be at most 200 bytes"):
        v.check_idempotency_key("k" * 201)
    for bad in ["", " k", "k\n", "k\u200b", "e\u0301", 5, b"k"]:
        with pytest.raises(InvalidInput, match="idempotency_key") as error:
            v.check_idempotency_key(bad)
        assert_refused(error)
        # Not an account id problem, so not the account id's error class.
        assert not isinstance(error.value, AccountIdError)


def test_reasons() -> None:
    assert v.check_reason("refund for order 42") == "refund for order 42"
    with pytest.raises(InvalidInput, match="reason"):
        v.check_reason("r" * 201)
    with pytest.raises(InvalidInput, match="reason"):
        v.check_reason("two\nlines")


def _acceptable(text: str) -> bool:
    return (
        0 < len(text.encode("utf-8", "surrogatepass")) <= v.MAX_ACCOUNT_ID_BYTES
        and not text[0].isspace()
        and not text[-1].isspace()
        and all(unicodedata.category(char) not in FORBIDDEN_CATEGORIES for char in text)
        and unicodedata.is_normalized("NFC", text)
    )


@given(st.text(max_size=300))
def test_any_text_is_accepted_unchanged_or_refused(text: str) -> None:
    # _acceptable restates the rules independently of the implementation.
    if _acceptable(text):
        assert v.check_account_id(text) == text
    else:
        with pytest.raises(AccountIdError) as error:
            v.check_account_id(text)
        assert_refused(error)


ID_CHARACTERS = st.characters(
    exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"),
)


@given(
    st.text(ID_CHARACTERS, min_size=1, max_size=64).map(lambda t: unicodedata.normalize("NFC", t))
)
def test_every_valid_id_round_trips(text: str) -> None:
    size = len(text.encode())
    assume(size <= v.MAX_ACCOUNT_ID_BYTES)  # NFC may lengthen a string
    assert v.check_account_id(text) == text
    if size <= v.MAX_IDEMPOTENCY_KEY_BYTES:
        assert v.check_idempotency_key(text) == text


@given(
    st.text(ID_CHARACTERS, min_size=1, max_size=20),
    st.sampled_from(["\n", "\x00", "\u200b", "\u202e", "\u2028", "\ufeff", "\x1b"]),
    st.integers(min_value=0, max_value=20),
)
def test_a_forbidden_character_anywhere_is_refused(text: str, bad: str, where: int) -> None:
    where = min(where, len(text))
    value = text[:where] + bad + text[where:]
    with pytest.raises(AccountIdError):
        v.check_account_id(value)
    with pytest.raises(InvalidInput):
        v.check_idempotency_key(value)


# -- durations --------------------------------------------------------------------

DAY_MS = 86_400_000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1000),
        (60, 60_000),
        (86_400, DAY_MS),
        (timedelta(seconds=1.5), 1500),
        (timedelta(milliseconds=1), 1),
        (timedelta(microseconds=2999), 2),  # floored to whole milliseconds
        (timedelta(days=1), DAY_MS),
        (Level.LOW, 3000),
    ],
)
def test_durations(value: object, expected: int) -> None:
    result = v.check_duration_ms(value, name="ttl", minimum_ms=1, maximum_ms=DAY_MS)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        86_401,
        10**400,
        timedelta(0),
        timedelta(microseconds=999),  # floors to 0 ms
        timedelta(seconds=-5),
        timedelta(days=2),
    ],
)
def test_durations_out_of_bounds(value: object) -> None:
    with pytest.raises(InvalidInput, match=r"ttl must be between 0\.001 s and 86400 s") as error:
        v.check_duration_ms(value, name="ttl", minimum_ms=1, maximum_ms=DAY_MS)
    assert_refused(error)


@pytest.mark.parametrize("value", [True, False, 1.5, math.nan, "60", None, Decimal(60)])
def test_durations_must_be_int_seconds_or_timedelta(value: object) -> None:
    with pytest.raises(InvalidInput, match="ttl must be whole seconds") as error:
        v.check_duration_ms(value, name="ttl", minimum_ms=1, maximum_ms=DAY_MS)
    assert_refused(error)


@given(st.integers(min_value=1, max_value=86_400))
def test_duration_seconds_round_trip(seconds: int) -> None:
    assert v.check_duration_ms(seconds, name="ttl", minimum_ms=1000, maximum_ms=DAY_MS) == (
        seconds * 1000
    )


# -- names and ids ----------------------------------------------------------------


def test_reservation_ids() -> None:
    rid = uuid.uuid4().hex
    assert v.check_reservation_id(rid) == rid
    for bad in [rid.upper(), rid[:31], rid + "0", "g" * 32, str(uuid.uuid4()), "", None, 5]:
        with pytest.raises(InvalidInput, match="reservation id must be 32 lowercase hex") as error:
            v.check_reservation_id(bad)
        assert_refused(error)


@given(st.uuids())
def test_every_uuid_hex_is_a_reservation_id(value: uuid.UUID) -> None:
    assert v.check_reservation_id(value.hex) == value.hex


@pytest.mark.parametrize("value", ["chat", "a", "9lives", "doc.v2:pages-x_y", "A" * 64])
def test_feature_names_accepted(value: str) -> None:
    assert v.check_feature_name(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "_chat",
        "-chat",
        ".chat",
        "a b",
        "a/b",
        "a{b}",
        "é",
        "\uff43\uff48\uff41\uff54",
        "\u0661",
        "A" * 65,
        None,
        5,
    ],
)
def test_feature_names_refused(value: object) -> None:
    with pytest.raises(InvalidInput, match="feature name must be") as error:
        v.check_feature_name(value)
    assert_refused(error)


@pytest.mark.parametrize("value", ["free", "paid", "team-2", "a_b", "a" * 32])
def test_plan_names_accepted(value: str) -> None:
    assert v.check_plan_name(value) == value


@pytest.mark.parametrize("value", ["", "Free", "2x", "_x", "a.b", "a:b", "a" * 33, "é", None])
def test_plan_names_refused(value: object) -> None:
    with pytest.raises(InvalidInput, match="plan name must be") as error:
        v.check_plan_name(value)
    assert_refused(error)


@pytest.mark.parametrize("value", ["rc", "A_b-1", "x" * 32, "_", "0"])
def test_key_prefixes_accepted(value: str) -> None:
    assert v.check_key_prefix(value) == value


@pytest.mark.parametrize("value", ["", "a{b", "a}b", "a:b", "a b", "x" * 33, "a.b", "é", None])
def test_key_prefixes_refused(value: object) -> None:
    with pytest.raises(InvalidInput, match="key prefix must be") as error:
        v.check_key_prefix(value)
    assert_refused(error)


def test_pattern_checks_return_plain_str() -> None:
    assert type(v.check_feature_name(Name("chat"))) is str
    assert type(v.check_plan_name(Name("free"))) is str


# -- short_repr ---------------------------------------------------------------------


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    "value",
    ["z" * 100_000, b"z" * 100_000, 2**100_000, -(2**100_000), list(range(10**5))],
    ids=["str", "bytes", "int", "negative-int", "list"],
)
def test_short_repr_is_short(value: object) -> None:
    assert len(v.short_repr(value)) < 120


def test_short_repr_survives_a_broken_repr() -> None:
    assert v.short_repr(BrokenRepr()).startswith("<BrokenRepr")
    # reprlib would fail on the nested int, which CPython refuses to print.
    assert v.short_repr([10**5000]) == "<list object>"
    assert v.short_repr("abc") == "'abc'"
    assert v.short_repr(5) == "5"
