"""redcredit: credits, chat-message quotas and reservations for LLM products.

The hot path runs as atomic Lua scripts in Redis; every change is journaled in
the same script, for the system of record to pick up.
"""

from importlib.metadata import version as _version

from .clients.async_client import AsyncRedCredit
from .clients.reservation import AsyncReservationBlock, Lease, ReservationBlock
from .clients.sync_client import RedCredit
from .config import LimitSettings, PlanSettings, RefillSettings, Settings
from .core.loader import AccountLoader, AccountSnapshot, AsyncAccountLoader
from .costs import CostRule, CostTable
from .errors import (
    AccountIdError,
    AlreadyApplied,
    BackendUnavailable,
    BalanceOverflow,
    BatchGone,
    ConfigError,
    EmbeddedServerError,
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
    UnknownFeature,
    UnknownPlan,
)
from .http.asgi import CreditGate
from .http.routes import Route
from .ledger.syncer import Syncer
from .results import (
    Balance,
    BalanceChange,
    LimitState,
    PlanChange,
    Reservation,
    ReservationRef,
    Settlement,
    SettlementOutcome,
    SpendResult,
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
    "ConfigError",
    "CostRule",
    "CostTable",
    "CreditGate",
    "EmbeddedServerError",
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
    "UnknownFeature",
    "UnknownPlan",
    "__version__",
]
