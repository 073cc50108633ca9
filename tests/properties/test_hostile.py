"""Hostile input at every public entry point: a typed error that names the argument, nothing written.

``test_bad_input.py`` covers amounts, ids, idempotency keys and TTLs on a few
methods of the synchronous client. This file takes every public method of
both clients (found by introspection, so a new method or argument without a
hostile case fails ``test_every_public_method_and_argument_has_hostile_cases``),
every argument of each, the ``redcredit`` command (flags, environment,
configuration files), the ASGI middleware and its routes, the FastAPI
dependency and ``Settings``.

Every refusal is made against a seeded deployment: balances, a live hold,
idempotency records, rate-limit state, journal entries both persisted and
still waiting, and PostgreSQL rows. Before and after, Redis (every key under
the prefix, dumped byte for byte, and the journal's consumer groups) and
PostgreSQL (every row of every table of the schema) must be identical, and
Redis must have run no script at all.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psycopg
import pytest
import redis
from psycopg import sql

from redcredit import (
    AccountIdError,
    AsyncRedCredit,
    BalanceOverflow,
    Cap,
    ConfigError,
    CostTable,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidInput,
    MoveRefused,
    RedCredit,
    RedCreditError,
    ReservationNotFound,
    ReservationRef,
    Scope,
    Settings,
    UnknownFeature,
    UnknownPlan,
    cli,
)
from redcredit.backends.migrate import migrate
from redcredit.config import LimitSettings, PlanSettings
from redcredit.errors import EmbeddedServerError
from redcredit.http.asgi import CreditGate
from redcredit.http.gatekeeper import Gatekeeper
from redcredit.http.problems import PROBLEM_CONTENT_TYPE, Problems
from redcredit.http.routes import Route
from redcredit.http.routes import Scope as ASGIScope
from redcredit.ledger.reconcile import scan_accounts
from redcredit.ledger.syncer import Syncer
from redcredit.servers.redis import EmbeddedRedis
from redcredit.validation import short_repr
from tests.support.helpers import snapshot

ROOT = Path(__file__).resolve().parents[2]
VICTIM = "victim"
OTHER = "other"
# Valid ids that look like parts of VICTIM's key names: they must stay apart.
NEIGHBOURS = ("victim}:a:victim", "{victim}", "victim:h", "victim*", "v\u0456ctim")
SECRET = "s3cret-pw"
COSTS = CostTable.from_mapping(
    {"image": 10, "chat": 2, "document": {"base": 2, "per_unit": 3, "unit": "pages"}}
)
STARTER = PlanSettings(
    limits=(
        LimitSettings(name="rpm", rate=1000, period=timedelta(minutes=1)),
        LimitSettings(
            name="tpm", kind="credits", rate=10**6, period=timedelta(minutes=1), per_model=True
        ),
    )
)


# -- hostile values --------------------------------------------------------------------------------


class Sneaky(int):
    """An int subclass whose own conversions lie: only its int value may count."""

    def __int__(self) -> int:
        return 1

    def __index__(self) -> int:
        return 1


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("a broken __repr__ must not mask the refusal")


HUGE = 10**5000  # past CPython's limit for printing an int
ODD_OBJECTS: list[object] = [object(), BadRepr(), complex(1, 0), [1], (1,), {1}, {"a": 1}]
# Refused wherever an unsigned amount is taken.
AMOUNTS: list[object] = [
    -1,
    -(2**63),
    2**53 + 1,
    2**64,
    HUGE,
    -HUGE,
    Sneaky(-5),
    -0.0,
    0.5,
    1.0,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    "1",
    " 1",
    "",
    None,
    Decimal(1),
    Decimal("NaN"),
    Fraction(1, 1),
    b"1",
    bytearray(b"1"),
    *ODD_OBJECTS,
]
# Refused for signed deltas (negatives down to -2**53 are corrections).
# Refused for signed deltas: the same, less the negatives a correction may take.
SIGNED: list[object] = [a for a in AMOUNTS if not (type(a) in (int, Sneaky) and -(2**53) <= a < 0)]
SIGNED.append(-(2**53) - 1)
ACCOUNT_IDS: list[object] = [
    "",
    " ",
    "\t",
    " lead",
    "trail ",
    "\u3000ideographic",
    "nbsp\u00a0",
    "a\nb",
    "a\rb",
    "\x00",
    "a\x00b",
    "del\x7f",
    "nel\x85",
    "a\u2028b",
    "a\u2029b",
    "zero\u200bwidth",
    "zw\u200djoiner",
    "\ufeffbom",
    "soft\u00adhyphen",
    "bidi\u202eevil",
    "isolate\u2066x",
    "tag\U000e0041",
    "\ud800",
    "lone\udfffsurrogate",
    "private\ue000",
    "plane15\U000f0000",
    "unassigned\u0378",
    "nonchar\U0010ffff",
    "e\u0301",
    "\u212b",
    "x" * 257,
    "\u00e9" * 129,
    "\U0001f600" * 65,
    "{" * 257,
    "z" * 1_000_000,
    0,
    5,
    -1,
    HUGE,
    1.5,
    math.nan,
    None,
    True,
    b"victim",
    bytearray(b"victim"),
    memoryview(b"victim"),
    Path("victim"),
    *ODD_OBJECTS,
]
# Shared by idempotency keys and reasons (both: text of at most 200 bytes).
SHORT_TEXTS: list[object] = [
    "",
    " k",
    "k ",
    "a\nb",
    "\x00",
    "a\u200bb",
    "\ud800",
    "x" * 201,
    "\u00e9" * 101,
    "y" * 1_000_000,
    5,
    HUGE,
    1.5,
    True,
    b"key",
    *ODD_OBJECTS,
]
TTLS: list[object] = [
    0,
    -1,
    86_401,
    366 * 86_400,
    10**12,
    HUGE,
    -HUGE,
    Sneaky(0),
    timedelta(0),
    timedelta(microseconds=1),
    timedelta(milliseconds=999),
    timedelta(days=1, milliseconds=1),
    timedelta(days=-1),
    timedelta.max,
    timedelta.min,
    1.5,
    60.0,
    math.nan,
    math.inf,
    True,
    "60",
    "PT1M",
    Decimal(60),
    b"60",
    *ODD_OBJECTS,
]
PRIORITIES: list[object] = [-1, 1001, True, 1.5, "1", 2**64]
# Naive, before 1970, or no datetime at all.
INSTANTS: list[object] = [
    datetime(2030, 1, 1),
    datetime(1960, 1, 1, tzinfo=UTC),
    "2030-01-01T00:00:00Z",
    1_900_000_000_000,
    1.5,
]
LIFETIMES: list[object] = [0, -1, timedelta(0), timedelta(milliseconds=999), "60", 1.5, 10**12]
MALFORMED_NAMES: list[object] = [
    "",
    " image",
    "image ",
    "im age",
    "-image",
    "x" * 65,
    "image\n",
    "\uff49mage",
    "imag\u0435",
    "im{age}",
    "im*",
    5,
    HUGE,
    True,
    b"image",
    *ODD_OBJECTS,
]
PLANS: list[object] = [
    "Free",
    "free ",
    "",
    "-free",
    "x" * 33,
    "fr\u0435e",
    "free\x00",
    5,
    HUGE,
    None,
    True,
    b"free",
    *ODD_OBJECTS,
]
LIMIT_NAMES: list[object] = [
    "",
    "RPM",
    "rpm.x",
    "rpm ",
    "1rpm",
    "x" * 33,
    "rp\u043c",
    "rpm\n",
    5,
    HUGE,
    True,
    b"rpm",
    *ODD_OBJECTS,
]
FLAGS: list[object] = [1, 0, "yes", "", None, 1.0, [True], HUGE]


def reservation_refs(live: ReservationRef) -> list[object]:
    """Things passed where a reservation belongs (ids and shapes only; accounts separately)."""
    return [
        None,
        VICTIM,
        live.id,
        5,
        HUGE,
        (VICTIM, live.id),
        {"account": VICTIM, "id": live.id},
        ReservationRef(VICTIM, live.id[:-1]),
        ReservationRef(VICTIM, live.id + "0"),
        ReservationRef(VICTIM, live.id.upper()),
        ReservationRef(VICTIM, str(uuid.UUID(live.id))),
        ReservationRef(VICTIM, live.id + "\n"),
        ReservationRef(VICTIM, 5),  # type: ignore[arg-type]
        ReservationRef(VICTIM, None),  # type: ignore[arg-type]
        ReservationRef(VICTIM, live.id.encode()),  # type: ignore[arg-type]
        *ODD_OBJECTS,
    ]


# -- cases -----------------------------------------------------------------------------------------


class Case(NamedTuple):
    param: str
    value: object
    # What the message must name (underscores may read as spaces).
    names: str
    error: type[RedCreditError] = InvalidInput

    def __repr__(self) -> str:
        return f"{self.param}={short_repr(self.value)}"


def _amount_cases(param: str, *, zero_refused: bool, signed: bool = False) -> list[Case]:
    values = SIGNED if signed else AMOUNTS
    cases = [Case(param, value, param) for value in values]
    if zero_refused:
        cases.append(Case(param, 0, param))
    return cases


def cases_for(method: str, live: ReservationRef) -> list[Case]:
    """Every hostile case of one client method, one argument at a time."""
    accounts = [Case("account", value, "account id", AccountIdError) for value in ACCOUNT_IDS]
    keys = [Case("idempotency_key", value, "idempotency_key") for value in SHORT_TEXTS]
    models = [Case("model", value, "model") for value in MALFORMED_NAMES]
    ttls = [Case("ttl", value, "ttl") for value in TTLS]
    label_features = [Case("feature", value, "feature") for value in MALFORMED_NAMES]
    priced_features = [
        *label_features,
        Case("feature", "unknown", "feature", UnknownFeature),
        # Reserved by the cost table, so never priced.
        Case("feature", "features", "feature", UnknownFeature),
        # Neither a feature nor a cost.
        Case("feature", None, "feature"),
    ]
    units = [Case("units", value, "units") for value in AMOUNTS]
    refs = [Case("reservation", value, "reservation") for value in reservation_refs(live)]
    ref_accounts = [
        Case("reservation", ReservationRef(value, live.id), "account id", AccountIdError)  # type: ignore[arg-type]
        for value in ACCOUNT_IDS
    ]
    flags = [Case("allow_late", value, "allow_late") for value in FLAGS]
    grant_ids = [Case("grant_id", value, "grant id") for value in [*MALFORMED_NAMES, "base"]]
    table: dict[str, list[Case]] = {
        "spend": [
            *accounts,
            *priced_features,
            *_amount_cases("cost", zero_refused=False),
            *units,
            *models,
            *keys,
        ],
        "chat_turn": [
            *accounts,
            *priced_features,
            *_amount_cases("cost", zero_refused=False),
            *units,
            *_amount_cases("messages", zero_refused=True),
            *models,
            *keys,
        ],
        "spend_chat_message": [
            *accounts,
            *_amount_cases("messages", zero_refused=True),
            *models,
            *keys,
        ],
        "grant": [
            *accounts,
            *_amount_cases("credits", zero_refused=True),
            *_amount_cases("chat_messages", zero_refused=True),
            *[Case("category", value, "category") for value in [*MALFORMED_NAMES, "gold"]],
            *[Case("priority", value, "priority") for value in PRIORITIES],
            *[Case("effective_at", value, "effective_at") for value in INSTANTS],
            *[Case("expires_at", value, "expires_at") for value in INSTANTS],
            *[Case("expires_in", value, "expires_in") for value in LIFETIMES],
            *grant_ids,
            *[Case("reason", value, "reason") for value in SHORT_TEXTS],
            *keys,
        ],
        "void": [
            *accounts,
            *grant_ids,
            *[Case("reason", value, "reason") for value in SHORT_TEXTS],
            *keys,
        ],
        "correct": [
            *accounts,
            *_amount_cases("credits", zero_refused=True, signed=True),
            *_amount_cases("chat_messages", zero_refused=True, signed=True),
            *[Case("reason", value, "reason") for value in SHORT_TEXTS],
            *keys,
        ],
        "set_plan": [
            *accounts,
            *[Case("plan", value, "plan") for value in PLANS],
            Case("plan", "gold", "plan", UnknownPlan),
            *keys,
        ],
        "balance": [*accounts, *models],
        "reset_limits": [
            *accounts,
            *[Case("name", value, "limit name") for value in LIMIT_NAMES],
            *keys,
        ],
        "reserve": [
            *accounts,
            *_amount_cases("amount", zero_refused=True),
            *ttls,
            *label_features,
            *_amount_cases("messages", zero_refused=False),
            *models,
            *keys,
        ],
        "settle": [
            *refs,
            *ref_accounts,
            *_amount_cases("actual", zero_refused=False),
            *flags,
            *keys,
        ],
        "release": [*refs, *ref_accounts, *keys],
        "extend": [*refs, *ref_accounts, *ttls],
        "attach": [
            *[Case("scope", value, "Scope") for value in ("acme", Scope("acme"), None, 3)],
            *keys,
        ],
        "move": [
            *accounts,
            *[Case("to", value, "to") for value in ("acme", 3, ("acme",), [])],
            # In its own subtree, or past four levels: refused before any I/O.
            Case("to", Scope("hostile-root", VICTIM), "subtree", MoveRefused),
            Case("to", Scope("a", "b", "c", "d"), "levels", MoveRefused),
            *[case for case in keys if case.value is not None],
            Case("idempotency_key", None, "idempotency_key"),
        ],
        "set_cap": [
            *accounts,
            *[Case("cap", value, "cap") for value in ("1000", 1000, {"credits": 1}, Scope("a"))],
            *keys,
        ],
        "reservation": [
            *accounts,
            *_amount_cases("amount", zero_refused=True),
            *ttls,
            *label_features,
            *flags,
        ],
    }
    return table[method]


# Public methods without a case, and why.
EXEMPT = {
    "close": "takes no argument",
    "ready": "takes no argument",
    # Drives an operation the engine built; the engine checks every argument
    # while building it, before run() is called (every case here does so).
    # A non-operation passed to run() directly still surfaces as Python's
    # TypeError: checking it would mean changing aio.py.
    "run": "takes only what the engine built",
}
METHODS = sorted(
    {
        "attach",
        "move",
        "set_cap",
        "spend",
        "chat_turn",
        "spend_chat_message",
        "grant",
        "void",
        "correct",
        "set_plan",
        "balance",
        "reset_limits",
        "reserve",
        "settle",
        "release",
        "extend",
        "reservation",
    }
)


def base_kwargs(method: str, param: str, live: ReservationRef) -> dict[str, object]:
    """Valid arguments for ``method``, so that only ``param`` is hostile."""
    if method == "settle":
        return {"reservation": live, "actual": 1}
    if method in ("release", "extend"):
        return {"reservation": live}
    if method in ("grant", "correct"):
        # Leaving both deltas at zero is itself refused.
        return (
            {"account": VICTIM}
            if param in ("credits", "chat_messages")
            else {"account": VICTIM, "credits": 1}
        )
    if method == "set_plan":
        return {"account": VICTIM, "plan": "starter"}
    if method == "void":
        return {"account": VICTIM} if param == "grant_id" else {"account": VICTIM, "grant_id": "g1"}
    if method in ("spend", "chat_turn"):
        if param == "feature":
            return {"account": VICTIM}
        if param == "units":
            return {"account": VICTIM, "feature": "document", "units": 1}
        return {"account": VICTIM, "cost": 1}
    if method in ("reserve", "reservation"):
        return {"account": VICTIM, "amount": 1}
    if method == "attach":
        return {"scope": Scope("hostile-root", VICTIM)}
    if method == "set_cap":
        return {"account": VICTIM, "cap": Cap(credits=1)}
    if method == "move":
        return {"account": VICTIM, "to": Scope("hostile-root"), "idempotency_key": "mv-1"}
    return {"account": VICTIM}


def message_problem(case: Case, refused: BaseException | None) -> str | None:
    """What is wrong with how ``case`` was refused; None when it was refused properly."""
    if refused is None:
        return f"{case!r}: accepted"
    if not isinstance(refused, case.error):
        return f"{case!r}: {type(refused).__name__} ({refused}), not {case.error.__name__}"
    message = str(refused)
    if case.names not in message and case.names.replace("_", " ") not in message:
        return f"{case!r}: the message does not name {case.names!r}: {message}"
    if len(message) > 500:
        return f"{case!r}: a message of {len(message)} characters"
    return None


# -- the seeded deployment -------------------------------------------------------------------------


@dataclass
class World:
    settings: Settings
    redis: redis.Redis
    pg: psycopg.Connection[Any]
    client: RedCredit
    live: ReservationRef
    # False on a shared server, whose script counter other clients move too.
    counts_scripts: bool

    @property
    def env(self) -> dict[str, str]:
        assert self.settings.redis_url is not None and self.settings.database_url is not None
        return {
            "REDCREDIT_REDIS_URL": self.settings.redis_url,
            "REDCREDIT_DATABASE_URL": self.settings.database_url,
            "REDCREDIT_PG_SCHEMA": self.settings.pg_schema,
            "REDCREDIT_KEY_PREFIX": self.settings.key_prefix,
        }

    def script_calls(self) -> int:
        stats = self.redis.info("commandstats")
        return sum(
            stats.get(f"cmdstat_{name}", {}).get("calls", 0)
            for name in ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
        )

    def state(self) -> tuple[Any, ...]:
        prefix = self.settings.key_prefix
        keys = sorted(self.redis.scan_iter(match=f"{prefix}*", count=1000))
        dumps = {key: self.redis.dump(key) for key in keys}
        groups = {
            key: self.redis.xinfo_groups(key) for key in keys if self.redis.type(key) == b"stream"
        }
        return (
            snapshot(self.redis, prefix),
            dumps,
            groups,
            pg_rows(self.pg, self.settings.pg_schema),
        )

    @contextlib.contextmanager
    def unchanged(self) -> Iterator[None]:
        """Fails unless Redis and PostgreSQL end as they began, with no script run in between."""
        before, calls = self.state(), self.script_calls()
        yield
        if self.counts_scripts:
            assert self.script_calls() == calls, "a refused call ran a script in Redis"
        after = self.state()
        for part, (old, new) in enumerate(zip(before, after, strict=True)):
            assert new == old, ("Redis keys", "Redis dumps", "journal groups", "PostgreSQL")[part]


def pg_rows(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[str]]:
    """Every row of every table of ``schema``, as text."""
    tables = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
        [schema],
    ).fetchall()
    return {
        table: sorted(
            row[0]
            for row in conn.execute(
                sql.SQL("SELECT t::text FROM {}.{} t").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
            )
        )
        for (table,) in tables
    }


@pytest.fixture(scope="module")
def own_redis(redis_url: str) -> Iterator[tuple[str, bool]]:
    """A server of this module's own, so that its script counter counts only these calls.

    With REDCREDIT_TEST_REDIS_URL and no server binary: the shared one, uncounted.
    """
    try:
        server = EmbeddedRedis().start()
    except EmbeddedServerError:
        if not os.environ.get("REDCREDIT_TEST_REDIS_URL"):
            raise
        yield redis_url, False
        return
    try:
        yield server.url, True
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(own_redis: tuple[str, bool], postgres_url: str) -> Iterator[World]:
    redis_url, counts_scripts = own_redis
    schema = "h" + uuid.uuid4().hex[:12]
    settings = Settings(
        redis_url=redis_url,
        key_prefix="h" + uuid.uuid4().hex[:12],
        free_credits=100,
        free_chat_messages=10,
        costs=COSTS,
        plans={"starter": STARTER},
        database_url=postgres_url,
        pg_schema=schema,
    )
    conn = psycopg.connect(postgres_url, autocommit=True)
    migrate(conn, schema)
    client = RedCredit(settings=settings)
    redis_client = redis.Redis.from_url(redis_url)
    try:
        client.grant(VICTIM, 50, chat_messages=5, reason="seed", idempotency_key="pay-1")
        client.spend(VICTIM, "image", idempotency_key="img-1")
        client.set_plan(OTHER, "starter")
        client.chat_turn(OTHER, cost=2, model="gpt-x")
        for neighbour in NEIGHBOURS:
            client.grant(neighbour, 7)
        with Syncer(settings) as syncer:
            syncer.drain(timeout_s=30)
        # These stay in the journal: PostgreSQL is behind, as in production.
        live = client.reserve(VICTIM, 10, ttl=timedelta(hours=1), idempotency_key="hold-1")
        client.spend(OTHER, cost=1)
        world = World(
            settings,
            redis_client,
            conn,
            client,
            ReservationRef(live.account, live.id),
            counts_scripts,
        )
        assert pg_rows(conn, schema)["ledger"], "nothing reached PostgreSQL"
        yield world
    finally:
        client.close()
        for key in redis_client.scan_iter(match=f"{settings.key_prefix}*"):
            redis_client.delete(key)
        redis_client.close()
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.close()


@pytest.fixture
async def async_client(world: World) -> AsyncIterator[AsyncRedCredit]:
    async with AsyncRedCredit(settings=world.settings) as client:
        yield client


# -- the library -----------------------------------------------------------------------------------


def test_every_public_method_and_argument_has_hostile_cases() -> None:
    live = ReservationRef(VICTIM, "0" * 32)
    for cls in (RedCredit, AsyncRedCredit):
        public = {
            name
            for name, _ in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")
        }
        assert public == set(METHODS) | set(EXEMPT), (
            f"{cls.__name__}: give a new method hostile cases in cases_for(), or a reason in EXEMPT"
        )
        for method in METHODS:
            arguments = set(inspect.signature(getattr(cls, method)).parameters) - {"self"}
            covered = {case.param for case in cases_for(method, live)}
            assert covered == arguments, f"{cls.__name__}.{method}: uncovered {arguments - covered}"


def _call_sync(client: RedCredit, method: str, kwargs: dict[str, Any]) -> None:
    if method == "reservation":
        with client.reservation(**kwargs):
            pass
    else:
        getattr(client, method)(**kwargs)


async def _call_async(client: AsyncRedCredit, method: str, kwargs: dict[str, Any]) -> None:
    if method == "reservation":
        async with client.reservation(**kwargs):
            pass
    else:
        await getattr(client, method)(**kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_sync_client_refuses_hostile_arguments(world: World, method: str) -> None:
    problems = []
    with world.unchanged():
        for case in cases_for(method, world.live):
            kwargs = {**base_kwargs(method, case.param, world.live), case.param: case.value}
            refused: BaseException | None = None
            try:
                _call_sync(world.client, method, kwargs)
            except Exception as exc:
                refused = exc
            if (problem := message_problem(case, refused)) is not None:
                problems.append(problem)
        # Before the state is compared: a refusal that went wrong says which.
        assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("method", METHODS)
async def test_async_client_refuses_hostile_arguments(
    world: World, async_client: AsyncRedCredit, method: str
) -> None:
    problems = []
    with world.unchanged():
        for case in cases_for(method, world.live):
            kwargs = {**base_kwargs(method, case.param, world.live), case.param: case.value}
            refused: BaseException | None = None
            try:
                await _call_async(async_client, method, kwargs)
            except Exception as exc:
                refused = exc
            if (problem := message_problem(case, refused)) is not None:
                problems.append(problem)
        assert not problems, "\n".join(problems[:40])


def test_refusals_after_reading_redis_change_nothing(world: World) -> None:
    """Well-formed calls that Redis refuses run their script, and still write nothing."""
    client, live = world.client, world.live
    unknown = ReservationRef(VICTIM, uuid.uuid4().hex)
    refusals: list[tuple[Callable[[], object], type[RedCreditError]]] = [
        (lambda: client.settle(unknown, 1), ReservationNotFound),
        (lambda: client.release(unknown), ReservationNotFound),
        (lambda: client.extend(unknown, ttl=30), ReservationNotFound),
        (lambda: client.spend(VICTIM, cost=2**53), InsufficientCredits),
        (lambda: client.reserve(VICTIM, 2**53), InsufficientCredits),
        (lambda: client.grant(VICTIM, 2**53), BalanceOverflow),
        # The seed's idempotency keys, reused for other calls.
        (lambda: client.grant(VICTIM, 51, idempotency_key="pay-1"), IdempotencyConflict),
        (lambda: client.spend(VICTIM, cost=3, idempotency_key="img-1"), IdempotencyConflict),
        (lambda: client.reserve(VICTIM, 11, idempotency_key="hold-1"), IdempotencyConflict),
        (lambda: client.settle(live, 1, idempotency_key="pay-1"), IdempotencyConflict),
    ]
    before = world.state()
    for call, error in refusals:
        with pytest.raises(error):
            call()
    assert world.state() == before


def test_valid_ids_with_key_syntax_get_accounts_of_their_own(
    rc: RedCredit, redis_client: redis.Redis, prefix: str
) -> None:
    """Braces, colons, globs and look-alikes are valid ids: each its own account, own keys."""
    ids = [
        "a",
        "a}:x",
        "a}:a:a",
        "a:h:a",
        "a:i:1:a",
        "{a}",
        "{0}",
        "}",
        "{",
        "*",
        "?",
        "[a-z]",
        "a:journal",
        "%s%n",
        "\\",
        "\u0430",  # Cyrillic a
        "\uff41",  # fullwidth a
        "A",
        "a" * 256,
        "\u00e9" * 128,
        "\U0001f600" * 64,
    ]
    held: dict[str, str] = {}
    for n, account in enumerate(ids, start=1):
        rc.grant(account, n, idempotency_key=f"k:{account[:20]}")
        held[account] = rc.reserve(account, 1, ttl=60).id
    space = rc.engine.keys
    owned: dict[bytes, str] = {}
    for n, account in enumerate(ids, start=1):
        balance = rc.balance(account)
        assert (balance.credits, balance.held) == (100 + n, 1), account
        keys = space.for_account(account)
        for key in (
            keys.hash,
            keys.holds,
            keys.idempotency(f"k:{account[:20]}"),
            keys.reservation(held[account]),
        ):
            assert redis_client.exists(key), (account, key)
            assert owned.setdefault(key.encode(), account) == account, (account, key)
        assert space.account_from_key(keys.hash.encode()) == account
    journals = {space.journal(p).encode() for p in range(space.partitions)}
    stray = set(redis_client.scan_iter(match=f"{prefix}*")) - set(owned) - journals
    assert not stray, f"keys nobody owns: {sorted(stray)[:5]}"
    # What eviction and reconciliation see: every account once, no phantom.
    assert set(scan_accounts(redis_client, space)) == set(ids)


def test_neighbours_of_the_victim_kept_their_own_balances(world: World) -> None:
    for neighbour in NEIGHBOURS:
        assert world.client.balance(neighbour).credits == 107, neighbour
    assert world.client.balance(VICTIM).credits == 140


def test_constructors_refuse_malformed_settings_and_urls(world: World) -> None:
    with world.unchanged():
        for settings in ("redis://localhost", {"redis_url": f"redis://:{SECRET}@h"}, 5, object()):
            with pytest.raises(
                ConfigError, match="settings must be a redcredit Settings"
            ) as refused:
                RedCredit(settings=settings)  # type: ignore[arg-type]
            assert SECRET not in str(refused.value)
        for url in ("nope", "http://h", f"redis://:{SECRET}@h:notaport/0", "redis://[::1"):
            for make in (
                lambda url=url: RedCredit(url, settings=world.settings),
                lambda url=url: AsyncRedCredit(url, settings=world.settings),
                lambda url=url: RedCredit(settings=Settings(redis_url=url)),
            ):
                with pytest.raises(ConfigError) as refused:
                    make()
                assert SECRET not in str(refused.value)
                assert "url" in str(refused.value).lower()
        with pytest.raises(ConfigError, match="Redis URL must be a str"):
            RedCredit(settings=world.settings.model_copy(update={"redis_url": b"redis://h"}))
        for client in (5, b"redis://h", object()):
            for kind in (RedCredit, AsyncRedCredit):
                with pytest.raises(
                    ConfigError, match="redis_client must be a URL or a Redis client"
                ):
                    kind(client, settings=world.settings)  # type: ignore[arg-type]
        for loader in (5, "loader", object()):
            for kind in (RedCredit, AsyncRedCredit):
                with pytest.raises(ConfigError, match="loader must have a load"):
                    kind(settings=world.settings, loader=loader)  # type: ignore[arg-type]


# -- Settings --------------------------------------------------------------------------------------

BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"partitions": HUGE}, "partitions"),
    ({"partitions": math.nan}, "partitions"),
    ({"partitions": Decimal(64)}, "partitions"),
    ({"free_credits": HUGE}, "free_credits"),
    ({"free_credits": math.inf}, "free_credits"),
    ({"free_chat_messages": "9" * 5000}, "free_chat_messages"),
    ({"free_chat_messages": Sneaky(-5)}, "free_chat_messages"),
    ({"reservation_ttl": HUGE}, "reservation_ttl"),
    ({"reservation_ttl": math.nan}, "reservation_ttl"),
    ({"reservation_ttl": math.inf}, "reservation_ttl"),
    ({"reservation_ttl": timedelta.max}, "reservation_ttl"),
    ({"reservation_ttl": -timedelta(days=1)}, "reservation_ttl"),
    ({"reservation_ttl": "P1000000000D"}, "reservation_ttl"),
    ({"reservation_ttl_max": timedelta(microseconds=1)}, "reservation_ttl_max"),
    ({"sync_interval": 0}, "sync_interval"),
    ({"durability_timeout": "soon"}, "durability_timeout"),
    ({"key_prefix": "\uff52c"}, "key prefix"),
    ({"key_prefix": "rc\n"}, "key prefix"),
    ({"key_prefix": "rc*"}, "key prefix"),
    ({"key_prefix": "x" * 33}, "key prefix"),
    ({"key_prefix": 5}, "key_prefix"),
    ({"sync_group": "a:b"}, "sync_group"),
    ({"pg_schema": 'x"; DROP SCHEMA public; --'}, "pg_schema"),
    ({"pg_schema": "Public"}, "pg_schema"),
    ({"pg_schema": "1abc"}, "pg_schema"),
    ({"pg_schema": "x" * 64}, "pg_schema"),
    ({"durability": True}, "durability"),
    ({"durability": "always"}, "durability"),
    ({"default_plan": "paid "}, "default_plan"),
    ({"default_plan": None}, "default_plan"),
    ({"plans": {"team": 5}}, "plans"),
    ({"plans": {"t" * 33: {}}}, "plan name"),
    ({"plans": {"team": {"limits": [{"name": "rpm", "rate": HUGE, "period": 60}]}}}, "rate"),
    ({"plans": {"team": {"limits": [{"name": "rpm", "rate": 1, "period": math.nan}]}}}, "period"),
    ({"plans": {"team": {"limits": [{"name": "rpm", "rate": 1, "period": 0}]}}}, "period"),
    ({"plans": {"team": {"limits": [{"name": "Bad", "rate": 1, "period": 60}]}}}, "name"),
    ({"plans": {"team": {"refill": {"every": "fortnight"}}}}, "every"),
    ({"plans": {"team": {"refill": {"every": "day", "timezone": "Mars/Olympus"}}}}, "time zone"),
    (
        {"plans": {"team": {"refill": {"every": "day", "timezone": "../../etc/passwd"}}}},
        "time zone",
    ),
    ({"plans": {"team": {"refill": {"every": 0}}}}, "every"),
    ({"costs": {"chat": HUGE}}, "chat"),
    ({"costs": {"chat": math.nan}}, "chat"),
    ({"costs": {"x" * 65: 1}}, "feature name"),
    ({"costs": {"": 1}}, "feature name"),
    ({"costs": {"doc": {"per_unit": math.inf}}}, "per_unit"),
    ({"costs": {"doc": {"per_unit": 1, "max_units": -1}}}, "max_units"),
    ({"costs": [("chat", 1)]}, "costs"),
    ({"redis_url": 5}, "redis_url"),
    ({"database_url": [f"postgresql://u:{SECRET}@h/db"]}, "database_url"),
    ({"database_pool_size": 0}, "database_pool_size"),
    ({"sync_batch_size": True}, "sync_batch_size"),
    ({"pipeline_max_batch": 10**6}, "pipeline_max_batch"),
    ({"surprise": 1}, "surprise"),
]


@pytest.mark.parametrize(("values", "names"), BAD_SETTINGS, ids=lambda x: short_repr(x)[:40])
def test_settings_refuse_malformed_values(values: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings(**values)
    message = str(refused.value)
    assert names in message
    assert SECRET not in message
    assert len(message) < 600


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture
def cli_env(world: World, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The world's settings as the command reads them, and no other REDCREDIT_ variable."""
    for name in os.environ:
        if name.startswith("REDCREDIT_"):
            monkeypatch.delenv(name)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    return world.env


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    try:
        code: object = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def cli_problem(argv: list[str], code: object, err: str, names: str) -> str | None:
    """What is wrong with how the command refused; None when it refused properly."""
    lines = err.strip().splitlines()
    if code != 2:
        return f"{argv}: exit {code!r}: {err[-300:]}"
    if "Traceback" in err or not lines:
        return f"{argv}: {err[-500:]}"
    # argparse prints its usage first; the reason is one line, the last.
    reason = lines[-1]
    if not (reason.startswith("redcredit") and ("error:" in reason or len(lines) == 1)):
        return f"{argv}: not one clear line: {err[-300:]}"
    if names.lower() not in reason.lower():
        return f"{argv}: does not name {names!r}: {reason}"
    if SECRET in err:
        return f"{argv}: shows the password: {reason}"
    return None


BAD_FLAGS: list[tuple[list[str], str]] = [
    *[
        (["evict", "--idle", value], "--idle")
        for value in ("-5", "0", "1" + "0" * 400, "9" * 5000, "1e3", "", "nan", "0x10", "31622401")
    ],
    *[
        (["reconcile", "--sample", value], "--sample")
        for value in ("0", "-1", str(2**53 + 1), "all", "1.5")
    ],
    *[
        (["sync", "--once", "--timeout", value], "--timeout")
        for value in ("nan", "inf", "-inf", "-1", "0", "1e400", "soon", "")
    ],
    *[
        (["demo", "--no-serve", "--port", value], "--port")
        for value in ("-1", "65536", "99999999999", "http", "80.5")
    ],
    *[
        (["demo", "--no-serve", "--serve-seconds", value], "--serve-seconds")
        for value in ("nan", "-1", "0", "inf", "1e400")
    ],
    (["frobnicate"], "frobnicate"),
    ([], "command"),
    (["migrate", "--force"], "--force"),
    (["--config"], "--config"),
    (["evict", "--idle"], "--idle"),
]


def test_cli_refuses_bad_flags_before_any_io(
    world: World, cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    problems = []
    with world.unchanged():
        for argv, names in BAD_FLAGS:
            code, err = run_cli(argv, capsys)
            if (problem := cli_problem(argv, code, err, names)) is not None:
                problems.append(problem)
        assert not problems, "\n".join(problems)


# Each refused by Settings, so by every command before it touches anything.
BAD_ENV: list[tuple[str, str, str]] = [
    ("REDCREDIT_PARTITIONS", "1e3", "partitions"),
    ("REDCREDIT_PARTITIONS", "9" * 5000, "partitions"),
    ("REDCREDIT_PARTITIONS", "", "partitions"),
    ("REDCREDIT_FREE_CREDITS", "NaN", "free_credits"),
    ("REDCREDIT_FREE_CREDITS", str(2**53 + 1), "free_credits"),
    ("REDCREDIT_FREE_CHAT_MESSAGES", "-0.5", "free_chat_messages"),
    ("REDCREDIT_RESERVATION_TTL", "-1", "reservation_ttl"),
    ("REDCREDIT_RESERVATION_TTL", "inf", "reservation_ttl"),
    ("REDCREDIT_RESERVATION_TTL", "P1000000000D", "reservation_ttl"),
    ("REDCREDIT_IDEMPOTENCY_WINDOW", "0.0001", "idempotency_window"),
    ("REDCREDIT_KEY_PREFIX", "{rc}", "key prefix"),
    ("REDCREDIT_KEY_PREFIX", "rc*", "key prefix"),
    ("REDCREDIT_KEY_PREFIX", "\uff52c", "key prefix"),
    ("REDCREDIT_PG_SCHEMA", 'x"; DROP SCHEMA public; --', "pg_schema"),
    ("REDCREDIT_PG_SCHEMA", "Public", "pg_schema"),
    ("REDCREDIT_SYNC_GROUP", "a:b", "sync_group"),
    ("REDCREDIT_DURABILITY", "always", "durability"),
    ("REDCREDIT_DEFAULT_PLAN", "Paid", "default_plan"),
    ("REDCREDIT_COSTS", '{"chat": NaN}', "chat"),
    ("REDCREDIT_COSTS", '{"chat": 1e400}', "chat"),
    ("REDCREDIT_COSTS", "[1, 2]", "costs"),
    ("REDCREDIT_COSTS__CHAT", "Infinity", "chat"),
    ("REDCREDIT_COSTS__DOC", '{"per_unit": 1, "max_units": -1}', "max_units"),
    ("REDCREDIT_PLANS", "nonsense", "plans"),
    ("REDCREDIT_PLANS__TEAM__LIMITS", '[{"name": "rpm", "rate": 0, "period": 60}]', "rate"),
    ("REDCREDIT_PLANS__TEAM__REFILL", '{"every": "fortnight"}', "every"),
    ("REDCREDIT_PLANS__TEAM__REFILL", '{"every": "day", "timezone": "Mars/Olympus"}', "time zone"),
    ("REDCREDIT_SYNC_BATCH_SIZE", "0", "sync_batch_size"),
    ("REDCREDIT_DATABASE_POOL_SIZE", "true", "database_pool_size"),
]
COMMANDS: list[list[str]] = [
    ["migrate"],
    ["sync", "--status"],
    ["sync", "--once"],
    ["reconcile"],
    ["evict"],
    ["demo", "--no-serve"],
]


def test_cli_refuses_bad_environment_before_any_io(
    world: World,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases = [(name, value, COMMANDS, names) for name, value, names in BAD_ENV]
    with world.unchanged():
        problems = cli_problems_under_env(cases, capsys, monkeypatch)
        assert not problems, "\n".join(problems[:40])


def cli_problems_under_env(
    cases: list[tuple[str, str, list[list[str]], str | None]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Runs each command with one environment variable set to a bad value.

    ``names`` (None: "redis" or "postgres" by the variable, or "url" when the
    message speaks of one) is what the refusal must name.
    """
    problems = []
    for name, value, commands, names in cases:
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            for command in commands:
                code, err = run_cli(command, capsys)
                expected = names
                if expected is None:
                    expected = (
                        "url"
                        if "url" in err.lower()
                        else ("redis" if "REDIS" in name else "postgres")
                    )
                if (problem := cli_problem([name, *command], code, err, expected)) is not None:
                    problems.append(problem)
    return problems


# Connection URLs, each tried by the commands that use it.
BAD_URLS: list[tuple[str, str, list[list[str]]]] = [
    *[
        ("REDCREDIT_REDIS_URL", url, [["sync", "--status"], ["reconcile"], ["evict"]])
        for url in ("nope", "http://h/0", f"redis://:{SECRET}@127.0.0.1:notaport/0", "redis://[::1")
    ],
    *[
        ("REDCREDIT_DATABASE_URL", url, [["migrate"], ["reconcile"], ["evict"]])
        for url in (
            "nonsense",
            f"postgresql://u:{SECRET}@[::1/db",
            f"user=u password={SECRET} junk",
            f"postgresql://u:{SECRET}@h/db?bogus=1",
        )
    ],
]


def test_cli_refuses_malformed_urls_without_showing_the_password(
    world: World,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases = [(name, url, commands, None) for name, url, commands in BAD_URLS]
    with world.unchanged():
        problems = cli_problems_under_env(cases, capsys, monkeypatch)
        assert not problems, "\n".join(problems)


BAD_CONFIG_FILES: list[tuple[str, bytes]] = [
    ("binary", b"\x00\xff\xfe\x00garbage"),
    ("utf-16", "[redcredit]\nfree_credits = 1\n".encode("utf-16")),
    ("nested arrays", b"a = " + b"[" * 100_000 + b"]" * 100_000),
    ("nested tables", b"a = " + b"{b = " * 5000 + b"1" + b"}" * 5000),
    ("huge int", b"[redcredit]\npartitions = 99999999999999999999999999"),
    ("nan", b"[redcredit]\nfree_credits = nan"),
    ("inf", b"[redcredit]\nfree_credits = inf"),
    ("inf ttl", b"[redcredit]\nreservation_ttl = 1e400"),
    ("negative ttl", b"[redcredit]\nreservation_ttl = -inf"),
    # Not key_prefix, redis_url, database_url or pg_schema: the environment
    # sets those here, and it takes precedence over the file.
    ("brace group", b'[redcredit]\nsync_group = "a}b"'),
    ("durability int", b"[redcredit]\ndurability = 5"),
    ("plan case", b'[redcredit]\ndefault_plan = "Free"'),
    ("array of tables", b"[[redcredit]]\nfree_credits = 1"),
    ("plans not a table", b"[redcredit]\nplans = 5"),
    ("zero period", b'[redcredit.plans.team]\nlimits = [{name = "rpm", rate = 1, period = 0}]'),
    ("cost past 2**53", b"[costs]\nchat = 9007199254740993"),
    ("empty feature", b'[costs]\n"" = 1'),
    ("NUL feature", b'[costs]\n"ch\\u0000at" = 1'),
    ("nan per_unit", b"[costs]\nchat = { per_unit = nan }"),
    ("costs twice", b"[costs]\nchat = 1\n[redcredit.costs]\nimage = 2"),
    ("costs array", b"costs = [1, 2]"),
]


def test_cli_refuses_malformed_config_files_before_any_io(
    world: World,
    cli_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    problems = []
    paths: list[tuple[str, str]] = []
    for name, content in BAD_CONFIG_FILES:
        path = tmp_path / f"{name.replace(' ', '-')}.toml"
        path.write_bytes(content)
        paths.append((str(path), str(path)))
    paths += [
        (str(tmp_path / "absent.toml"), "absent.toml"),
        (str(tmp_path), str(tmp_path)),
        (str(tmp_path / "nul\x00.toml"), "nul"),
    ]
    with world.unchanged():
        for path, names in paths:
            for command in COMMANDS[:-1]:
                argv = ["--config", path, *command]
                code, err = run_cli(argv, capsys)
                if (problem := cli_problem(argv, code, err, names)) is not None:
                    problems.append(problem)
        # The demo has settings of its own: a file given to it is refused, not ignored.
        argv = ["--config", paths[0][0], "demo", "--no-serve"]
        code, err = run_cli(argv, capsys)
        if (problem := cli_problem(argv, code, err, "--config")) is not None:
            problems.append(problem)
        assert not problems, "\n".join(problems[:40])


def test_cli_as_a_process_prints_one_line_and_no_traceback(world: World, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDCREDIT_")}
    nested = tmp_path / "nested.toml"
    nested.write_bytes(b"a = " + b"[" * 100_000 + b"]" * 100_000)
    with world.unchanged():
        for argv, names in (
            (["--config", str(nested), "evict"], "nested.toml"),
            (["evict", "--idle", "-5"], "--idle"),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "redcredit.cli", *argv],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, **world.env},
                check=False,
            )
            assert cli_problem(argv, done.returncode, done.stderr, names) is None, done.stderr


# -- the ASGI middleware ---------------------------------------------------------------------------


class Recorder:
    """The app behind the gate: answers 200 and counts the requests that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: ASGIScope, receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _account_of(scope: ASGIScope) -> Any:
    # The test puts any object here; a real app would read its session or a header.
    return scope.get("test_account", VICTIM)


ASGI_ROUTES = [
    Route("POST", "/chat", cost=3, messages=1),
    Route("POST", "/image", feature="image", messages=0),
    Route("POST", "/priced", cost=lambda scope: scope["test_cost"], messages=0),
    Route("POST", "/chat-priced", cost=lambda scope: scope["test_cost"], messages=1),
    Route("POST", "/stream", stream=True, max_cost=lambda scope: scope["test_cost"], messages=0),
    Route("POST", "/shadow", cost=1, messages=0, shadow=True),
    Route("POST", "/open", cost=1, messages=0, on_unavailable="open"),
]


async def asgi_request(
    gate: CreditGate, path: str, **extra: Any
) -> tuple[int, dict[str, str], bytes]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        **extra,
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await gate(scope, receive, send)
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def http_problem(
    what: str, status: int, headers: dict[str, str], body: bytes, names: str
) -> str | None:
    import json

    if status != 400:
        return f"{what}: status {status}: {body[:200]!r}"
    if headers.get("content-type") != PROBLEM_CONTENT_TYPE:
        return f"{what}: content type {headers.get('content-type')}"
    problem = json.loads(body)
    if problem.get("type") != "urn:redcredit:problem:invalid-request":
        return f"{what}: problem {problem}"
    if names not in problem["detail"]:
        return f"{what}: the detail does not name {names!r}: {problem['detail']}"
    return None


# None is not hostile here: it means "no paying account" (401).
HEADER_ACCOUNTS: list[object] = [
    value
    for value in ACCOUNT_IDS
    if value is not None and not (isinstance(value, str) and len(value) > 2000)
]
HTTP_COSTS: list[object] = [
    -1,
    2**53 + 1,
    HUGE,
    1.5,
    math.nan,
    math.inf,
    "3",
    True,
    Decimal(3),
    b"3",
    None,
]


async def test_gate_answers_hostile_requests_with_400_and_charges_nothing(
    world: World, async_client: AsyncRedCredit
) -> None:
    app = Recorder()
    gate = CreditGate(
        app,
        client=async_client,
        identify=_account_of,
        routes=ASGI_ROUTES,
        idempotency_key=lambda scope: scope.get("test_key"),
    )
    problems = []
    tried = 0
    with world.unchanged():
        for account in HEADER_ACCOUNTS:
            for path in ("/chat", "/image", "/stream", "/shadow", "/open"):
                status, headers, body = await asgi_request(
                    gate, path, test_account=account, test_cost=5
                )
                tried += 1
                what = f"{path} account={short_repr(account)}"
                if (problem := http_problem(what, status, headers, body, "account id")) is not None:
                    problems.append(problem)
        for key in SHORT_TEXTS:
            for path in ("/chat", "/stream", "/shadow"):
                status, headers, body = await asgi_request(gate, path, test_key=key, test_cost=5)
                tried += 1
                what = f"{path} key={short_repr(key)}"
                if (
                    problem := http_problem(what, status, headers, body, "idempotency_key")
                ) is not None:
                    problems.append(problem)
        for cost in HTTP_COSTS:
            for path in ("/priced", "/chat-priced", "/stream"):
                if cost is None and path != "/priced":
                    # A chat route without a price spends chat messages only; a
                    # stream route without one is a ConfigError (below).
                    continue
                status, headers, body = await asgi_request(gate, path, test_cost=cost)
                tried += 1
                names = "amount" if path == "/stream" else "cost"
                what = f"{path} cost={short_repr(cost)}"
                if (problem := http_problem(what, status, headers, body, names)) is not None:
                    problems.append(problem)
        # A raw header, as a client sends it: bytes that are not UTF-8 become lone surrogates.
        raw = CreditGate(
            app,
            client=async_client,
            identify=lambda scope: dict(scope["headers"])[b"x-account"].decode(
                "utf-8", "surrogateescape"
            ),
            routes=ASGI_ROUTES,
        )
        for header in (b"\xff\xfe", b"a\xc0b", b" padded", b"x" * 300):
            status, headers, body = await asgi_request(
                raw, "/chat", headers=[(b"x-account", header)]
            )
            tried += 1
            if (
                problem := http_problem(
                    f"header {short_repr(header)}", status, headers, body, "account id"
                )
            ) is not None:
                problems.append(problem)
        with pytest.raises(ConfigError, match="max_cost"):
            await asgi_request(gate, "/stream", test_cost=None)
        assert not problems, "\n".join(problems[:40])
    assert app.calls == 0
    assert gate.stats.invalid + raw.stats.invalid == tried
    assert gate.stats.allowed == gate.stats.shadow_refusals == gate.stats.ungated == 0


BAD_ROUTES: list[tuple[dict[str, Any], str]] = [
    ({"cost": math.nan}, "cost"),
    ({"cost": math.inf}, "cost"),
    ({"cost": 2**53 + 1}, "cost"),
    ({"cost": HUGE}, "cost"),
    ({"cost": True}, "cost"),
    ({"cost": "3"}, "cost"),
    ({"cost": Decimal(3)}, "cost"),
    ({"messages": 2**53 + 1}, "messages"),
    ({"messages": HUGE}, "messages"),
    ({"messages": 1.0}, "messages"),
    ({"messages": [HUGE]}, "messages"),
    ({"feature": "bad name"}, "feature"),
    ({"feature": ""}, "feature"),
    ({"feature": 5}, "feature"),
    ({"feature": "x" * 65, "cost": None}, "feature"),
    ({"model": "bad model"}, "model"),
    ({"model": HUGE}, "model"),
    ({"shadow": "no"}, "shadow"),
    ({"shadow": 1}, "shadow"),
    ({"stream": "yes", "max_cost": 5, "cost": None}, "stream"),
    ({"method": HUGE}, "method"),
    ({"method": "GET\r\nX"}, "method"),
    ({"path": HUGE}, "path"),
    ({"path": "x" * 10_000}, "path"),
    ({"path": "/{a b}"}, "placeholder"),
    ({"on_disconnect": HUGE}, "on_disconnect"),
    ({"on_unavailable": ["open"]}, "on_unavailable"),
    ({"stream": True, "max_cost": math.nan, "cost": None}, "max_cost"),
    ({"stream": True, "max_cost": -1, "cost": None}, "max_cost"),
    ({"stream": True, "max_cost": 5, "cost": None, "feature": "bad name"}, "feature"),
]


@pytest.mark.parametrize(("options", "names"), BAD_ROUTES, ids=lambda x: short_repr(x)[:40])
def test_routes_refuse_hostile_configuration(options: dict[str, Any], names: str) -> None:
    arguments: dict[str, Any] = {"method": "POST", "path": "/x", "cost": 1, **options}
    with pytest.raises(ConfigError) as refused:
        Route(**arguments)
    assert names in str(refused.value)
    assert len(str(refused.value)) < 500


async def test_gate_refuses_hostile_configuration(async_client: AsyncRedCredit) -> None:
    app = Recorder()
    stream = {"method": "POST", "path": "/s", "stream": True, "max_cost": 5}
    bad_gates: list[tuple[dict[str, Any], str]] = [
        *[({"routes": [Route(**stream, stream_ttl=ttl)]}, "ttl") for ttl in TTLS[:12]],
        ({"routes": [Route("POST", "/x", feature="unknown", messages=0)]}, "unknown"),
        ({"routes": [5]}, "Route"),
        ({"routes": [HUGE]}, "Route"),
        ({"unidentified": "maybe"}, "unidentified"),
        ({"unidentified": HUGE}, "unidentified"),
        ({"identify": None}, "identify"),
        *[
            ({"deadline_s": value}, "deadline_s")
            for value in (0, -1, math.nan, math.inf, HUGE, True, "1")
        ],
        ({"problems": None, "deadline_s": 10**400}, "deadline_s"),
    ]
    for options, names in bad_gates:
        arguments = {"client": async_client, "identify": _account_of, "routes": [], **options}
        with pytest.raises(ConfigError) as refused:
            CreditGate(app, **arguments)
        assert names in str(refused.value), options
    with pytest.raises(ConfigError, match=re.escape("400..599")):
        Problems(statuses={"invalid-request": HUGE})
    with pytest.raises(ConfigError, match="deadline_s"):
        Gatekeeper(async_client, deadline_s=math.nan)


async def test_fastapi_dependency_answers_hostile_accounts_with_400(
    world: World, async_client: AsyncRedCredit
) -> None:
    from fastapi import Depends, FastAPI, Header

    from redcredit.http.fastapi import add_problem_handler, gate

    def account(x_account: str = Header("")) -> str:
        return x_account

    app = FastAPI()
    add_problem_handler(app)
    charge = gate(async_client, identify=account, cost=1, messages=0)

    @app.post("/x", dependencies=[Depends(charge)])
    async def endpoint() -> dict[str, str]:
        return {"ok": "yes"}

    transport = httpx.ASGITransport(app=app)
    with world.unchanged():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for header in ("x" * 300, "\u00e9" * 129, "a\u200bb", "nul\x00"):
                response = await http.post("/x", headers={"x-account": header.encode("utf-8")})
                assert response.status_code == 400, response.text
                assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
                assert "account id" in response.json()["detail"]
    assert charge.stats.invalid == 4
