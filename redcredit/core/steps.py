"""What an engine operation yields to its driver: a script call, or an account to load.

The clients and the routers import these, and nothing else of the engine's
inner workings; :func:`check_durable` reads the WAITAOF / WAIT answer sent in
the same round trip as a call.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import NotDurable
from .replies import Status
from .scripts import LuaScript

__all__ = ["LoadAccount", "Operation", "ScriptCall", "Step", "check_durable"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """Run ``script`` with EVALSHA; the driver answers with the raw reply."""

    script: LuaScript
    keys: Sequence[str]
    args: Sequence[str | int]
    # A WAITAOF or WAIT command to send in the same round trip, when the
    # settings ask for durability before answering.
    wait: tuple[str | int, ...] | None = None


@dataclass(frozen=True, slots=True)
class LoadAccount:
    """Load an account absent from Redis; the driver answers with an AccountSnapshot."""

    account: str


Step = ScriptCall | LoadAccount
Operation = Generator[Step, Any, T]


def check_durable(call: ScriptCall, reply: Any, acknowledged: Any) -> None:
    """Raises NotDurable when WAITAOF / WAIT did not confirm a change in time.

    A refusal, or an account still to be loaded, changed nothing: no need to wait.
    """
    if call.wait is None or reply[0] != Status.OK:
        return
    confirmed = int(acknowledged[0]) if call.wait[0] == "WAITAOF" else int(acknowledged)
    if confirmed < 1:
        where = "the AOF" if call.wait[0] == "WAITAOF" else "a replica"
        raise NotDurable(
            f"the change was applied but not confirmed on {where} in time; "
            "retry with the same idempotency key to learn its outcome"
        )
