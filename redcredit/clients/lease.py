"""What a reservation block records while it runs, shared by the sync and async blocks."""

from __future__ import annotations

from .. import validation as v
from ..errors import InvalidInput
from ..results import Reservation, Settlement

__all__ = ["Lease"]


class Lease:
    """Handed to the body of a reservation block.

    The body reports what the work actually cost with :meth:`add` (as it goes,
    e.g. per token) or :meth:`set_actual`; on normal exit the block settles
    that cost, or the whole reservation if nothing was reported.
    """

    __slots__ = ("_actual", "reservation", "settlement", "ttl_ms")

    def __init__(self, reservation: Reservation, ttl_ms: int) -> None:
        self.reservation = reservation
        self.ttl_ms = ttl_ms
        self.settlement: Settlement | None = None
        self._actual: int | None = None

    @property
    def actual(self) -> int | None:
        return self._actual

    def add(self, amount: int) -> int:
        amount = v.check_amount(amount, name="amount")
        total = (self._actual or 0) + amount
        if total > v.MAX_AMOUNT:
            raise InvalidInput(f"reported usage would pass {v.MAX_AMOUNT}")
        self._actual = total
        return total

    def set_actual(self, amount: int) -> None:
        self._actual = v.check_amount(amount, name="amount")

    def final_cost(self) -> int:
        return self.reservation.amount if self._actual is None else self._actual

    def renew_interval(self) -> float:
        """Seconds between renewals: a third of the lease, so two renewals may fail in a row."""
        return self.ttl_ms / 3000
