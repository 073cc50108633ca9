"""Argument checks, run before any I/O so a refused call changes nothing.

Each check returns the normalised value or raises a typed error that names the
parameter and shows a shortened repr of what was given (an id of 10 kB is not
echoed back whole).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import timedelta
from typing import Final

from .errors import AccountIdError, InvalidInput

__all__ = [
    "MAX_ACCOUNT_ID_BYTES",
    "MAX_AMOUNT",
    "MAX_IDEMPOTENCY_KEY_BYTES",
    "MAX_REASON_BYTES",
    "check_account_id",
    "check_amount",
    "check_duration_ms",
    "check_feature_name",
    "check_idempotency_key",
    "check_key_prefix",
    "check_plan_name",
    "check_reason",
    "check_reservation_id",
    "check_signed_amount",
]

# Lua numbers are doubles: every integer up to 2**53 is exact, so amounts and
# balances stay within it.
MAX_AMOUNT: Final = 2**53
MAX_ACCOUNT_ID_BYTES: Final = 256
MAX_IDEMPOTENCY_KEY_BYTES: Final = 200
MAX_REASON_BYTES: Final = 200

# Control, format (zero-width, bidi), surrogate, private-use, unassigned and
# line/paragraph separators: invisible or able to break a log line or a key.
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_PRINTABLE_ASCII: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_RESERVATION_ID: Final = re.compile(r"[0-9a-f]{32}")
_FEATURE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_PLAN: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(text)} chars)"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_amount(value: object, *, name: str = "amount", allow_zero: bool = True) -> int:
    if not _is_int(value):
        raise InvalidInput(f"{name} must be an int, not {type(value).__name__} {_shown(value)}")
    number: int = value  # type: ignore[assignment]
    low = 0 if allow_zero else 1
    if not low <= number <= MAX_AMOUNT:
        raise InvalidInput(f"{name} must be between {low} and 2**53, not {_shown(number)}")
    return number


def check_signed_amount(value: object, *, name: str) -> int:
    """A signed delta (corrections); zero is allowed, the caller refuses a no-op."""
    if not _is_int(value):
        raise InvalidInput(f"{name} must be an int, not {type(value).__name__} {_shown(value)}")
    number: int = value  # type: ignore[assignment]
    if not -MAX_AMOUNT <= number <= MAX_AMOUNT:
        raise InvalidInput(f"{name} must be between -2**53 and 2**53, not {_shown(number)}")
    return number


def _check_text(value: object, *, name: str, max_bytes: int, error: type[InvalidInput]) -> str:
    if not isinstance(value, str):
        raise error(f"{name} must be a str, not {type(value).__name__} {_shown(value)}")
    if _PRINTABLE_ASCII.fullmatch(value):
        # The common case, and nothing more to check: ASCII is NFC and one byte a char.
        if len(value) > max_bytes:
            raise error(f"{name} is longer than {max_bytes} bytes: {_shown(value)}")
        return value
    if not value:
        raise error(f"{name} must not be empty")
    if len(value.encode()) > max_bytes:
        raise error(f"{name} is longer than {max_bytes} bytes in UTF-8: {_shown(value)}")
    if value != value.strip():
        raise error(f"{name} must not start or end with white space: {_shown(value)}")
    for char in value:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise error(
                f"{name} holds a control or invisible character U+{ord(char):04X}: {_shown(value)}"
            )
    if not unicodedata.is_normalized("NFC", value):
        # Two spellings of one visible id must not become two accounts.
        raise error(f"{name} must be NFC-normalised Unicode: {_shown(value)}")
    return value


def check_account_id(value: object) -> str:
    return _check_text(
        value, name="account id", max_bytes=MAX_ACCOUNT_ID_BYTES, error=AccountIdError
    )


def check_idempotency_key(value: object) -> str | None:
    if value is None:
        return None
    return _check_text(
        value, name="idempotency_key", max_bytes=MAX_IDEMPOTENCY_KEY_BYTES, error=InvalidInput
    )


def check_reason(value: object) -> str:
    return _check_text(value, name="reason", max_bytes=MAX_REASON_BYTES, error=InvalidInput)


def check_duration_ms(value: object, *, name: str, minimum_ms: int, maximum_ms: int) -> int:
    """A duration given as whole seconds (int) or a timedelta, as milliseconds within bounds."""
    if isinstance(value, timedelta):
        ms = value // timedelta(milliseconds=1)
    elif _is_int(value):
        seconds: int = value  # type: ignore[assignment]
        if abs(seconds) > MAX_AMOUNT // 1000:
            ms = MAX_AMOUNT if seconds > 0 else -1
        else:
            ms = seconds * 1000
    else:
        raise InvalidInput(
            f"{name} must be whole seconds (int) or a timedelta, not "
            f"{type(value).__name__} {_shown(value)}"
        )
    if not minimum_ms <= ms <= maximum_ms:
        raise InvalidInput(
            f"{name} must be between {minimum_ms / 1000:g} s and {maximum_ms / 1000:g} s, "
            f"not {_shown(value)}"
        )
    return ms


def _check_pattern(value: object, pattern: re.Pattern[str], name: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{name} must be {rule}, not {_shown(value)}")
    return value


def check_reservation_id(value: object) -> str:
    return _check_pattern(value, _RESERVATION_ID, "reservation id", "32 lowercase hex characters")


def check_feature_name(value: object) -> str:
    return _check_pattern(
        value, _FEATURE, "feature", "1-64 characters of A-Z a-z 0-9 _ . : - starting alphanumeric"
    )


def check_plan_name(value: object) -> str:
    return _check_pattern(
        value, _PLAN, "plan", "1-32 characters of a-z 0-9 _ - starting with a letter"
    )


def check_key_prefix(value: object) -> str:
    return _check_pattern(value, _PREFIX, "key prefix", "1-32 characters of A-Z a-z 0-9 _ -")
