"""Argument checks, run before any I/O so that a refused call changes nothing.

Each check returns the normalised value or raises a typed error that names the
parameter and shows a shortened repr of what was given: an id of 10 kB is not
echoed back whole, and an int of a million digits is described, not printed.

Normalised means: an ``int`` subclass (an ``IntEnum``, say) comes back as a
plain ``int`` and a ``str`` subclass as a plain ``str``, because the Redis
client would otherwise send the repr of an enum member instead of its value.
"""

from __future__ import annotations

import json
import re
import reprlib
import unicodedata
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

from .errors import AccountIdError, InvalidInput

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "MAX_ACCOUNT_ID_BYTES",
    "MAX_AMOUNT",
    "MAX_IDEMPOTENCY_KEY_BYTES",
    "MAX_PRIORITY",
    "MAX_REASON_BYTES",
    "RESERVED_GRANT_IDS",
    "check_account_id",
    "check_amount",
    "check_category",
    "check_duration_ms",
    "check_feature_name",
    "check_grant_id",
    "check_idempotency_key",
    "check_instant_ms",
    "check_key_prefix",
    "check_limit_name",
    "check_model_name",
    "check_plan_name",
    "check_priority",
    "check_reason",
    "check_reservation_id",
    "check_reservation_parts",
    "check_signed_amount",
    "describe_validation_error",
    "short_repr",
]

# Lua numbers are doubles: every integer up to 2**53 is exact, so amounts and
# balances stay within it.
MAX_AMOUNT: Final = 2**53
MAX_ACCOUNT_ID_BYTES: Final = 256
MAX_IDEMPOTENCY_KEY_BYTES: Final = 200
MAX_REASON_BYTES: Final = 200

# Control, format (zero-width, bidi), surrogate, private-use, unassigned and
# line/paragraph separators: invisible, or able to break a log line or fake
# another id on screen.
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_RESERVATION_ID: Final = re.compile(r"[0-9a-f]{32}")
_FEATURE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_PLAN: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_LIMIT: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_GRANT_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
# Ids the scripts give buckets of their own.
RESERVED_GRANT_IDS: Final = frozenset({"base", "refill"})
MAX_PRIORITY: Final = 1000
_PREFIX: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")

_SHOWN_CHARS: Final = 60
# Past this many bits, repr() is long (and past ~14,000 bits CPython refuses
# to convert the int to text at all).
_SHOWN_INT_BITS: Final = 128

_repr = reprlib.Repr()
_repr.maxstring = _SHOWN_CHARS
_repr.maxother = _SHOWN_CHARS
_repr.maxlong = _SHOWN_CHARS


def short_repr(value: object) -> str:
    """A repr of ``value`` short enough for an error message, whatever its size."""
    if isinstance(value, int) and value.bit_length() > _SHOWN_INT_BITS:
        return f"<{type(value).__name__} of {value.bit_length()} bits>"
    if isinstance(value, str | bytes) and len(value) > _SHOWN_CHARS:
        # Head and tail, because a stray character at either end is a common fault.
        head = _clipped(value[:40], 50, keep_end=False)
        tail = _clipped(value[-12:], 20, keep_end=True)
        return f"{head}...{tail} ({len(value)} {_units(value)})"
    try:
        return _repr.repr(value)
    except Exception:
        # A broken __repr__ (or a huge int nested in a list) must not mask the refusal.
        return f"<{type(value).__name__} object>"


def _clipped(part: str | bytes, budget: int, *, keep_end: bool) -> str:
    # An escape (\x00, \U000e0041) shows as up to ten characters: fewer of those fit.
    shown = repr(part)
    while len(shown) > budget and len(part) > 1:
        half = len(part) // 2
        part = part[half:] if keep_end else part[:half]
        shown = repr(part)
    return shown


def _units(value: str | bytes) -> str:
    return "chars" if isinstance(value, str) else "bytes"


def describe_validation_error(exc: ValidationError) -> str:
    """One line per pydantic error: where, what, and a short repr of the input."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        cause = error.get("ctx", {}).get("error")
        # Our own checks already name the value; pydantic would prefix "Value error, ".
        message = str(cause) if isinstance(cause, ValueError) else error["msg"]
        if where and error["type"] not in {"missing", "value_error"}:
            message = f"{message} (got {short_repr(error['input'])})"
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def _not_int(name: str, value: object) -> InvalidInput:
    return InvalidInput(f"{name} must be an int, not {type(value).__name__} {short_repr(value)}")


def _as_int(value: object, name: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        # int.__int__ copies the value out without consulting an overridden __int__.
        return int.__int__(value)
    # bool is refused because True would silently mean 1; floats, Decimals and
    # strings because a non-integral or parsed amount is a caller bug.
    raise _not_int(name, value)


def check_amount(value: object, *, name: str = "amount", allow_zero: bool = True) -> int:
    """An int in ``0..MAX_AMOUNT`` (``1..MAX_AMOUNT`` when ``allow_zero`` is false)."""
    number = _as_int(value, name)
    low = 0 if allow_zero else 1
    if number < low or number > MAX_AMOUNT:
        raise InvalidInput(f"{name} must be between {low} and 2**53, not {short_repr(number)}")
    return number


def check_signed_amount(value: object, *, name: str, allow_zero: bool = True) -> int:
    """An int in ``-MAX_AMOUNT..MAX_AMOUNT``, for signed corrections.

    Zero passes by default because a correction has two deltas (credits and
    chat messages) and only one of them needs to be non-zero; the caller
    refuses the call when both are. ``allow_zero=False`` refuses it here.
    """
    number = _as_int(value, name)
    if number < -MAX_AMOUNT or number > MAX_AMOUNT:
        raise InvalidInput(f"{name} must be between -2**53 and 2**53, not {short_repr(number)}")
    if number == 0 and not allow_zero:
        raise InvalidInput(f"{name} must not be zero")
    return number


def _check_text(value: object, *, name: str, max_bytes: int, error: type[InvalidInput]) -> str:
    if type(value) is not str:
        if not isinstance(value, str):
            raise error(f"{name} must be a str, not {type(value).__name__} {short_repr(value)}")
        value = str.__str__(value)
    size = len(value)
    if 0 < size <= max_bytes and value.isascii() and value.isprintable():
        # The common case: printable ASCII is NFC, one byte a character, and
        # only a space at either end can be wrong.
        if value[0] == " " or value[-1] == " ":
            raise error(f"{name} must not start or end with white space: {short_repr(value)}")
        return value
    if size == 0:
        raise error(f"{name} must not be empty")
    # Every character takes at least one byte, so a long str is refused before
    # it is encoded; surrogatepass lets a lone surrogate be counted here and
    # refused by category below instead of raising UnicodeEncodeError.
    if size > max_bytes or len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise error(f"{name} must be at most {max_bytes} bytes in UTF-8: {short_repr(value)}")
    for char in value:
        category = unicodedata.category(char)
        if category in _FORBIDDEN_CATEGORIES:
            raise error(
                f"{name} must not hold U+{ord(char):04X} "
                f"({unicodedata.name(char, 'unnamed')}, category {category}), a control, "
                f"invisible or unassigned character: {short_repr(value)}"
            )
    if value[0].isspace() or value[-1].isspace():
        raise error(f"{name} must not start or end with white space: {short_repr(value)}")
    if not unicodedata.is_normalized("NFC", value):
        # Two encodings of one visible id must not become two accounts.
        raise error(
            f"{name} must be NFC-normalised Unicode (apply unicodedata.normalize('NFC', ...) "
            f"first): {short_repr(value)}"
        )
    return value


def check_account_id(value: object) -> str:
    """A str of 1 to 256 UTF-8 bytes, NFC, without control or invisible characters.

    Braces, colons, glob characters and letters of any script are allowed: key
    names are built so that an id cannot escape its place in them.
    """
    return _check_text(
        value, name="account id", max_bytes=MAX_ACCOUNT_ID_BYTES, error=AccountIdError
    )


def check_idempotency_key(value: object) -> str | None:
    """``None``, or a str with the rules of an account id but at most 200 bytes."""
    if value is None:
        return None
    return _check_text(
        value, name="idempotency_key", max_bytes=MAX_IDEMPOTENCY_KEY_BYTES, error=InvalidInput
    )


def check_reason(value: object) -> str:
    """A free-text reason for the journal, with the rules of an account id, at most 200 bytes."""
    return _check_text(value, name="reason", max_bytes=MAX_REASON_BYTES, error=InvalidInput)


def _seconds(ms: int) -> str:
    return f"{ms // 1000} s" if ms % 1000 == 0 else f"{ms / 1000} s"


def check_duration_ms(value: object, *, name: str, minimum_ms: int, maximum_ms: int) -> int:
    """Whole seconds (int) or a timedelta, as milliseconds in ``minimum_ms..maximum_ms``.

    A timedelta is floored to whole milliseconds before the bounds are checked.
    """
    if isinstance(value, timedelta):
        ms = value // timedelta(milliseconds=1)
        given = str(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        ms = int.__int__(value) * 1000
        given = f"{short_repr(int.__int__(value))} s"
    else:
        raise InvalidInput(
            f"{name} must be whole seconds (int) or a timedelta, not "
            f"{type(value).__name__} {short_repr(value)}"
        )
    if ms < minimum_ms or ms > maximum_ms:
        raise InvalidInput(
            f"{name} must be between {_seconds(minimum_ms)} and {_seconds(maximum_ms)}, not {given}"
        )
    return ms


def _check_pattern(value: object, pattern: re.Pattern[str], name: str, rule: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidInput(f"{name} must be {rule}, not {short_repr(value)}")
    return value if type(value) is str else str.__str__(value)


def check_reservation_id(value: object) -> str:
    """32 lowercase hex characters, as ``uuid.uuid4().hex`` makes."""
    return _check_pattern(value, _RESERVATION_ID, "reservation id", "32 lowercase hex characters")


def check_grant_id(value: object) -> str:
    """1 to 64 characters of ``A-Z a-z 0-9 _ . : -``, starting with a letter or digit.

    ``base`` and ``refill`` name the buckets of the account and of its plan's
    refill, which are not granted by id.
    """
    grant_id = _check_pattern(
        value,
        _GRANT_ID,
        "grant id",
        "1 to 64 of A-Z a-z 0-9 _ . : - starting with a letter or digit",
    )
    if grant_id in RESERVED_GRANT_IDS:
        raise InvalidInput(f"grant id {grant_id!r} is reserved for the bucket the scripts keep")
    return grant_id


_CATEGORY: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")


def check_category(value: object, allowed: tuple[str, ...] | None) -> str:
    """A grant category: one of ``allowed`` (the configured ones) when given."""
    category = _check_pattern(
        value, _CATEGORY, "category", "1 to 32 of a-z 0-9 _ starting with a letter"
    )
    if allowed is not None and category not in allowed:
        raise InvalidInput(
            f"category {category!r} is not configured (grants.categories: {', '.join(allowed)})"
        )
    return category


def check_priority(value: object) -> int:
    """An int from 0 to 1000: lower burns first."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise InvalidInput(
            f"priority must be an int from 0 to {MAX_PRIORITY}, not {short_repr(value)}"
        )
    return int.__int__(value)


def check_instant_ms(value: object, *, name: str) -> int:
    """A timezone-aware datetime, as ms since the epoch (after 1970, before year 9999)."""
    if not isinstance(value, datetime):
        raise InvalidInput(
            f"{name} must be a timezone-aware datetime, not {type(value).__name__} "
            f"{short_repr(value)}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{name} must be timezone-aware, not the naive {value.isoformat()}")
    ms = int(value.timestamp() * 1000)
    if ms <= 0:
        raise InvalidInput(f"{name} must lie after 1970, not {value.isoformat()}")
    return ms


_ABSENT: Final = object()


def check_reservation_parts(reservation: object) -> tuple[str, str]:
    """The account and id of a Reservation, a ReservationRef, or anything shaped like them."""
    account = getattr(reservation, "account", _ABSENT)
    reservation_id = getattr(reservation, "id", _ABSENT)
    if account is _ABSENT or reservation_id is _ABSENT:
        raise InvalidInput(
            "reservation must be a Reservation or ReservationRef, not "
            f"{type(reservation).__name__} {short_repr(reservation)}"
        )
    return check_account_id(account), check_reservation_id(reservation_id)


def check_feature_name(value: object) -> str:
    """1 to 64 characters of ``A-Z a-z 0-9 _ . : -``, starting with a letter or digit."""
    return _check_pattern(
        value,
        _FEATURE,
        "feature name",
        "1-64 characters of A-Z a-z 0-9 _ . : - starting with a letter or digit",
    )


def check_model_name(value: object) -> str:
    """A model name, with the rules of a feature name."""
    return _check_pattern(
        value,
        _FEATURE,
        "model",
        "1-64 characters of A-Z a-z 0-9 _ . : - starting with a letter or digit",
    )


def check_limit_name(value: object) -> str:
    """1 to 32 characters of ``a-z 0-9 _``, starting with a letter, as a plan's limits are named."""
    return _check_pattern(
        value, _LIMIT, "limit name", "1-32 characters of a-z 0-9 _ starting with a letter"
    )


def check_plan_name(value: object) -> str:
    """1 to 32 characters of ``a-z 0-9 _ -``, starting with a letter."""
    return _check_pattern(
        value, _PLAN, "plan name", "1-32 characters of a-z 0-9 _ - starting with a letter"
    )


def check_key_prefix(value: object) -> str:
    """1 to 32 characters of ``A-Z a-z 0-9 _ -``: no brace (hash tags) and no colon (separator)."""
    return _check_pattern(value, _PREFIX, "key prefix", "1-32 characters of A-Z a-z 0-9 _ -")


def cluster_choice(value: object) -> bool | str:
    """``redis_cluster``: "auto", or a boolean (from the environment: true/false, 1/0)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else value
    choices: dict[object, bool | str] = {"auto": "auto", "true": True, "false": False}
    choices |= {"1": True, "0": False}
    if text in choices:
        return choices[text]
    raise ValueError(f"redis_cluster must be auto, true or false, not {short_repr(value)}")


def seed_nodes(value: object) -> tuple[str, ...]:
    """``redis_seed_nodes``: a list of host:port, or (from the environment) JSON or "a:1,b:2"."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"redis_seed_nodes: {exc}") from exc
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple):
        raise ValueError(f"redis_seed_nodes must be a list of host:port, not {short_repr(value)}")
    for node in value:
        host, _, port = str(node).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"redis_seed_nodes: {short_repr(node)} is not host:port")
    return tuple(str(node) for node in value)
