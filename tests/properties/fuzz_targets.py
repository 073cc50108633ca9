"""Fuzz targets over the argument checks (validation.py) and the key builder (keys.py).

The property: any value either passes a check, coming back normalised, or is
refused with :class:`~redcredit.InvalidInput`, never another exception; and the
keys built for accepted ids are well formed, carry their partition's hash tag
under the prefix, and never name a key of another account.

:func:`fuzz_one` turns raw bytes into values of many types (ints around the
2**53 limit and past CPython's printing limit, floats with NaN and infinities,
text with confusables, braces, glob characters, controls and lone
surrogates), so the same target serves hypothesis in CI (``tests/properties/test_fuzz.py``)
and a coverage-guided run with atheris, when it is installed::

    python -m tests.properties.fuzz_targets -runs=200000        # libFuzzer flags
    python -m tests.properties.fuzz_targets -max_total_time=60
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import struct
import sys
import unicodedata
from collections.abc import Callable, Iterable
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from functools import partial
from typing import Any, Final

from redis.crc import key_slot

from redcredit import validation as v
from redcredit.core.keys import KeySpace
from redcredit.costs import CostRule
from redcredit.errors import ConfigError, InvalidInput, RedCreditError

__all__ = ["VALIDATORS", "Reader", "check_keys", "check_value", "fuzz_one", "main"]

FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
MAX_MESSAGE: Final = 500
MIN_PARTITIONS: Final = 64
MAX_PARTITIONS: Final = 16384
TTL_MIN_MS: Final = 1_000
TTL_MAX_MS: Final = 86_400_000

# Characters that key names, Redis glob patterns, Cluster hash tags, logs and
# eyes treat specially: separators, tags, globs, controls, invisible and bidi
# marks, combining marks, look-alikes of ASCII letters, and edge whitespace.
INTERESTING: Final = (
    "a{}:*?[]^-\\/%$'\"`|;,.=@#! "
    "\x00\t\n\r\x0b\x0c\x1b\x7f\x85\u00a0\u00ad\u034f\u061c\u200b\u200c\u200d\u200e\u200f"
    "\u2028\u2029\u202a\u202e\u2060\u2066\u2069\u3000\ufeff\ufff9\ufffd\ufffe\uffff"
    "\u0301\u0323\u0308\u1e9b\u212b\u00c5\u00e9e\u0430\u0435\u043e\u0440\u0441\u0445"
    "\u0391\u03bf\uff41\uff5b\uff5d\uff1a\u2126\u03a9\u017f\ufb01\u1100\u3164"
    "\ud800\udfff\ue000\U000f0000\U000e0041\U0010ffff\u0378\U0001f600"
)
BOUNDARIES: Final = (
    0,
    1,
    v.MAX_AMOUNT - 1,
    v.MAX_AMOUNT,
    v.MAX_AMOUNT + 1,
    2**63 - 1,
    2**63,
    2**64,
    TTL_MIN_MS // 1000,
    TTL_MAX_MS // 1000,
    v.MAX_ACCOUNT_ID_BYTES,
    v.MAX_IDEMPOTENCY_KEY_BYTES,
)


class Level(int):
    """An int subclass whose own conversions lie: only its int value may count."""

    def __int__(self) -> int:
        return 1

    def __index__(self) -> int:
        return 1


class Name(str):
    """A str subclass whose ``__str__`` lies: only its text may count."""

    def __str__(self) -> str:
        return "victim"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("a broken __repr__ must not mask the refusal")


class Reader:
    """Draws typed values from fuzzer bytes; past the end it reads zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def more(self) -> bool:
        return self.at < len(self.data)

    def take(self, count: int) -> bytes:
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return chunk.ljust(count, b"\x00")

    def byte(self) -> int:
        return self.take(1)[0]

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "little")

    def text(self) -> str:
        """Text in one of several shapes, each reaching a different branch of the checks."""
        kind = self.byte() % 6
        length = self.byte()
        if kind == 0:
            return self.take(length).decode("utf-8", "surrogateescape")
        if kind == 1:
            return "".join(chr(self.uint(3) % 0x110000) for _ in range(length % 64))
        if kind == 2:
            return "".join(INTERESTING[self.byte() % len(INTERESTING)] for _ in range(length % 64))
        if kind == 3:
            # Lengths around the byte limits, in one- to four-byte characters.
            char = ("x", "\u00e9", "\u20ac", "\U0001f600")[length % 4]
            return char * (self.uint(2) % 300)
        if kind == 4:
            return "".join(chr(0x20 + self.byte() % 0x5F) for _ in range(length % 70))
        return uuid_like(self.take(16))

    def value(self, depth: int = 0) -> object:
        kind = self.byte() % 18
        if kind == 0:
            return int.from_bytes(self.take(1), "little", signed=True)
        if kind == 1:
            return int.from_bytes(self.take(self.byte() % 40), "little", signed=True)
        if kind == 2:
            base = BOUNDARIES[self.byte() % len(BOUNDARIES)]
            return base + (self.byte() % 5) - 2 if self.byte() % 2 else -base
        if kind == 3:
            value: float = struct.unpack("<d", self.take(8))[0]
            return value
        if kind == 4:
            return (math.nan, math.inf, -math.inf, -0.0, 0.5, 1.0, 1e308)[self.byte() % 7]
        if kind in (5, 6, 7):
            return self.text()
        if kind == 8:
            return self.take(self.byte() % 40)
        if kind == 9:
            return bool(self.byte() % 2)
        if kind == 10:
            return None
        if kind == 11:
            return timedelta(microseconds=int.from_bytes(self.take(6), "little", signed=True))
        if kind == 12:
            return (Decimal(self.byte()), Decimal("NaN"), Fraction(self.byte(), 1))[self.byte() % 3]
        if kind == 13:
            return Level(int.from_bytes(self.take(8), "little", signed=True))
        if kind == 14:
            return Name(self.text())
        if kind == 15:
            # Past CPython's 4300-digit limit for printing an int.
            return 10 ** (4000 + self.uint(2) % 2000) * (1 if self.byte() % 2 else -1)
        if kind == 16 and depth < 2:
            return [self.value(depth + 1)]
        return (BadRepr(), complex(1, 0), object(), bytearray(b"1"), {"amount": 1})[self.byte() % 5]


def uuid_like(raw: bytes) -> str:
    return raw.hex()


def _text_ok(result: str, value: object, limit: int) -> None:
    assert type(result) is str
    assert result == value
    assert 0 < len(result.encode("utf-8")) <= limit
    assert not any(unicodedata.category(c) in FORBIDDEN_CATEGORIES for c in result)
    assert not result[0].isspace() and not result[-1].isspace()
    assert unicodedata.is_normalized("NFC", result)


def _amount_ok(low: int) -> Callable[[object, object], None]:
    def ok(result: object, value: object) -> None:
        assert type(result) is int
        assert low <= result <= v.MAX_AMOUNT
        assert isinstance(value, int) and not isinstance(value, bool)
        assert result == int.__int__(value)

    return ok


def _pattern_ok(pattern: str) -> Callable[[object, object], None]:
    compiled = re.compile(pattern)

    def ok(result: object, value: object) -> None:
        assert type(result) is str and result == value
        assert compiled.fullmatch(result)

    return ok


def _signed_ok(result: object, value: object) -> None:
    assert type(result) is int and -v.MAX_AMOUNT <= result <= v.MAX_AMOUNT


def _duration_ok(result: object, value: object) -> None:
    assert type(result) is int and TTL_MIN_MS <= result <= TTL_MAX_MS
    assert isinstance(value, int | timedelta) and not isinstance(value, bool)


def _idempotency_ok(result: object, value: object) -> None:
    if value is None:
        assert result is None
    else:
        assert isinstance(result, str)
        _text_ok(result, value, v.MAX_IDEMPOTENCY_KEY_BYTES)


# Each check with what an accepted value must look like afterwards.
VALIDATORS: Final[
    dict[str, tuple[Callable[[object], object], Callable[[object, object], None]]]
] = {
    "amount": (v.check_amount, _amount_ok(0)),
    "positive amount": (partial(v.check_amount, allow_zero=False), _amount_ok(1)),
    "signed amount": (partial(v.check_signed_amount, name="credits"), _signed_ok),
    "account id": (
        v.check_account_id,
        lambda result, value: _text_ok(result, value, v.MAX_ACCOUNT_ID_BYTES),
    ),
    "idempotency key": (v.check_idempotency_key, _idempotency_ok),
    "reason": (
        v.check_reason,
        lambda result, value: _text_ok(result, value, v.MAX_REASON_BYTES),
    ),
    "duration": (
        partial(v.check_duration_ms, name="ttl", minimum_ms=TTL_MIN_MS, maximum_ms=TTL_MAX_MS),
        _duration_ok,
    ),
    "reservation id": (v.check_reservation_id, _pattern_ok(r"[0-9a-f]{32}")),
    "feature": (v.check_feature_name, _pattern_ok(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")),
    "model": (v.check_model_name, _pattern_ok(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")),
    "limit": (v.check_limit_name, _pattern_ok(r"[a-z][a-z0-9_]{0,31}")),
    "plan": (v.check_plan_name, _pattern_ok(r"[a-z][a-z0-9_-]{0,31}")),
    "key prefix": (v.check_key_prefix, _pattern_ok(r"[A-Za-z0-9_-]{1,32}")),
}


def check_value(value: object) -> int:
    """Runs every check on ``value``; returns how many accepted it.

    Fails (AssertionError, or whatever escaped) unless each check either
    accepts a well-formed result or refuses with a short InvalidInput.
    """
    accepted = 0
    for name, (check, well_formed) in VALIDATORS.items():
        refusal: InvalidInput | None = None
        try:
            result = check(value)
        except InvalidInput as refused:
            refusal = refused
        if refusal is None:
            well_formed(result, value)
            accepted += 1
        else:
            _refusal_ok(refusal, name)
    shown = v.short_repr(value)
    assert isinstance(shown, str) and len(shown) < 200
    config_refusal: ConfigError | None = None
    try:
        # pydantic's errors pass through describe_validation_error.
        CostRule(per_unit=value)
    except ConfigError as refused:
        config_refusal = refused
    if config_refusal is not None:
        _refusal_ok(config_refusal, "per_unit")
    return accepted


def _refusal_ok(refusal: RedCreditError, name: str) -> None:
    assert isinstance(refusal, ValueError)
    message = str(refusal)
    assert 0 < len(message) < MAX_MESSAGE, (name, message)


def _hash_tag(key: str) -> str:
    """The part of ``key`` that Redis Cluster hashes (its first non-empty ``{...}``)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def check_keys(
    prefix: str,
    partitions: int,
    accounts: Iterable[str],
    idempotency_keys: Iterable[str] = (),
    reservation_ids: Iterable[str] = (),
) -> dict[str, tuple[object, ...]]:
    """Builds every key of every account; fails on a malformed key or one named twice.

    All arguments must have passed their checks. Returns each key with its owner.
    """
    space = KeySpace(f"{prefix}:v1", partitions)
    owners: dict[str, tuple[object, ...]] = {}
    keys_of_idem = list(idempotency_keys)
    reservations = list(reservation_ids)

    def claim(key: str, owner: tuple[object, ...], partition: int) -> None:
        assert key.startswith(f"{prefix}:v1:{{{partition}}}:"), key
        assert _hash_tag(key) == str(partition), key
        previous = owners.setdefault(key, owner)
        assert previous == owner, f"{key!r} is both {previous} and {owner}"

    for account in accounts:
        partition = space.partition(account)
        assert 0 <= partition < partitions
        keys = space.for_account(account)
        assert keys.account == account
        journal = space.journal(partition)
        assert keys.journal == journal
        claim(journal, ("journal", partition), partition)
        claim(keys.hash, ("hash", account), partition)
        claim(keys.holds, ("holds", account), partition)
        claim(keys.idempotency(None), ("no key", account), partition)
        for key in keys_of_idem:
            claim(keys.idempotency(key), ("idempotency", account, key), partition)
        for reservation in reservations:
            claim(keys.reservation(reservation), ("reservation", account, reservation), partition)
        assert keys.common(None) == [keys.hash, keys.holds, journal, keys.idempotency(None)]
        # Eviction and reconciliation find accounts back from their hash key.
        assert space.account_from_key(keys.hash) == account
        assert space.account_from_key(keys.hash.encode()) == account
        slot = key_slot(journal.encode())
        for key in (keys.hash, keys.holds, keys.idempotency(None)):
            assert key_slot(key.encode()) == slot
    return owners


def _accepted(check: Callable[[object], object], values: Iterable[object]) -> list[Any]:
    kept = []
    for value in values:
        with contextlib.suppress(InvalidInput):
            kept.append(check(value))
    return kept


def fuzz_one(data: bytes) -> None:
    """One fuzz input: its values through every check, its ids through the key builder."""
    reader = Reader(data)
    values = [reader.value()]
    while reader.more() and len(values) < 12:
        values.append(reader.value())
    for value in values:
        check_value(value)
    prefixes = _accepted(v.check_key_prefix, [values[0]]) or ["rc"]
    partitions = MIN_PARTITIONS + reader.uint(2) % (MAX_PARTITIONS - MIN_PARTITIONS + 1)
    texts = [value for value in values if isinstance(value, str)]
    accounts = set(_accepted(v.check_account_id, [*texts, *(t + "}:a:x" for t in texts)]))
    check_keys(
        prefixes[0],
        partitions,
        sorted(accounts),
        _accepted(v.check_idempotency_key, texts)[:4],
        _accepted(v.check_reservation_id, texts)[:4] or ["0" * 32],
    )


def main(argv: list[str]) -> int:
    try:
        import atheris  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print(
            "atheris is not installed (pip install atheris); skipped. "
            "tests/properties/test_fuzz.py runs the same target under hypothesis.",
            file=sys.stderr,
        )
        return 0
    # Only the code under test (and the decoder, whose branches are worth
    # exploring too): instrument_all() would take a minute over pydantic & co.
    for module in (v, sys.modules[KeySpace.__module__], sys.modules[__name__]):
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__ or name.startswith("__"):
                continue
            if inspect.isfunction(obj):
                atheris.instrument_func(obj)
            elif inspect.isclass(obj):
                for attribute in vars(obj).values():
                    if inspect.isfunction(attribute):
                        atheris.instrument_func(attribute)
    # Lets libFuzzer learn the strings the checks' regexes compare against.
    atheris.enabled_hooks.add("RegEx")
    atheris.enabled_hooks.add("str")
    atheris.Setup(argv, fuzz_one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
