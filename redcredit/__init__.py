"""redcredit: credits, chat-message quotas and reservations for LLM products.

The hot path runs as atomic Lua scripts in Redis; every change is journaled in
the same script, for the system of record to pick up.
"""

from importlib.metadata import version as _version

from .clients.async_client import AsyncRedCredit
from .clients.reservation import AsyncReservationBlock, Lease, ReservationBlock
from .clients.sync_client import RedCredit
from .config import GrantSettings, LimitSettings, PlanSettings, RefillSettings, Settings
from .core.loader import AccountLoader, AccountSnapshot, AsyncAccountLoader, BucketSnapshot
from .costs import CostRule, CostTable
from .errors import (
    AccountIdError,
    AlreadyApplied,
    BackendUnavailable,
    BalanceOverflow,
    BatchGone,
    ConfigError,
    EmbeddedServerError,
    GrantError,
    GrantExists,
    GrantExpired,
    GrantNotFound,
    IdempotencyConflict,
    InsufficientChatMessages,
    InsufficientCredits,
    InsufficientFunds,
    InvalidInput,
    NotDurable,
    RateLimited,
    RedCreditError,
    RedisAuthError,
    RedisCommandError,
    RedisRefused,
    ReservationClosed,
    ReservationError,
    ReservationLapsed,
    ReservationNotFound,
    TooManyGrants,
    UnknownFeature,
    UnknownPlan,
)
from .http.asgi import CreditGate
from .http.routes import Route
from .ledger.syncer import Syncer
from .results import (
    Balance,
    BalanceChange,
    CreditBucket,
    LimitState,
    PlanChange,
    Reservation,
    ReservationRef,
    Settlement,
    SettlementOutcome,
    SpendResult,
    Void,
)

__version__: str = _version("redcredit")  # pyproject.toml's, as installed

__all__ = [
    "AccountIdError",
    "AccountLoader",
    "AccountSnapshot",
    "AlreadyApplied",
    "AsyncAccountLoader",
    "AsyncRedCredit",
    "AsyncReservationBlock",
    "BackendUnavailable",
    "Balance",
    "BalanceChange",
    "BalanceOverflow",
    "BatchGone",
    "BucketSnapshot",
    "ConfigError",
    "CostRule",
    "CostTable",
    "CreditBucket",
    "CreditGate",
    "EmbeddedServerError",
    "GrantError",
    "GrantExists",
    "GrantExpired",
    "GrantNotFound",
    "GrantSettings",
    "IdempotencyConflict",
    "InsufficientChatMessages",
    "InsufficientCredits",
    "InsufficientFunds",
    "InvalidInput",
    "Lease",
    "LimitSettings",
    "LimitState",
    "NotDurable",
    "PlanChange",
    "PlanSettings",
    "RateLimited",
    "RedCredit",
    "RedCreditError",
    "RedisAuthError",
    "RedisCommandError",
    "RedisRefused",
    "RefillSettings",
    "Reservation",
    "ReservationBlock",
    "ReservationClosed",
    "ReservationError",
    "ReservationLapsed",
    "ReservationNotFound",
    "ReservationRef",
    "Route",
    "Settings",
    "Settlement",
    "SettlementOutcome",
    "SpendResult",
    "Syncer",
    "TooManyGrants",
    "UnknownFeature",
    "UnknownPlan",
    "Void",
    "__version__",
]
