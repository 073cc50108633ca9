"""Leases: a hold, what its work reported, and the one renewal policy every holder follows.

:class:`Lease` is handed to the body of a reservation block and, as
``request.state.redcredit``, to the endpoint of a gated stream. The blocks
reserve on entry, renew while the body runs (the sync one from a thread, the
async one from a task) and settle or release on exit; the ASGI gate renews
its holds with :func:`renew_until_cancelled` too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol

from typing_extensions import TypeVar

from .. import validation as v
from ..errors import BackendUnavailable, InvalidInput, RedCreditError, ReservationError
from ..results import Reservation, Settlement
from ..scopes import Scope

if TYPE_CHECKING:
    from ..core.engine import Engine

__all__ = [
    "AsyncReservationBlock",
    "Lease",
    "ReservationBlock",
    "keep_renewing",
    "renew_until_cancelled",
    "stop_renewing",
]

log = logging.getLogger("redcredit")

# A block's lease always holds its reservation; the gate's handle holds none
# when a request went through uncharged.
HoldT = TypeVar("HoldT", bound=Reservation | None, default=Reservation)


class Lease(Generic[HoldT]):
    """A hold and what its work reported.

    The work reports what it actually cost with :meth:`add` (as it goes, e.g.
    per token) or :meth:`set_actual` (``set``) once; at the end the holder
    settles that cost, or the whole reservation if nothing was reported.
    ``gated`` is false only for the gate's handle of a request let through
    without a hold (Redis away on an ``open`` route, a shadow refusal, an
    unidentified request let through): its reports are kept, nothing is charged.
    """

    __slots__ = ("_actual", "reservation", "settlement", "ttl_ms")

    def __init__(self, reservation: HoldT, ttl_ms: int) -> None:
        self.reservation = reservation
        self.ttl_ms = ttl_ms
        self.settlement: Settlement | None = None
        self._actual: int | None = None

    @property
    def gated(self) -> bool:
        return self.reservation is not None

    @property
    def reserved(self) -> int:
        return 0 if self.reservation is None else self.reservation.amount

    @property
    def actual(self) -> int | None:
        """What was reported so far; ``None`` if nothing was."""
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

    # The gate's endpoints were taught these names; both spellings stay.
    used = actual
    set = set_actual

    def final_cost(self) -> int:
        return self.reserved if self._actual is None else self._actual

    def renew_interval(self) -> float:
        """Seconds between renewals: a third of the lease, so two renewals may fail in a row."""
        return self.ttl_ms / 3000

    def __repr__(self) -> str:
        held = None if self.reservation is None else self.reservation.id
        return f"Lease(reservation={held}, ttl_ms={self.ttl_ms}, actual={self._actual})"


def keep_renewing(exc: Exception, lease: Lease[Any]) -> bool:
    """Whether a lease whose renewal raised ``exc`` is worth renewing again; logged either way.

    Only an outage is retried: Redis unreachable or slow, or refusing for now
    (:class:`~redcredit.errors.RedisRefused`: OOM, READONLY after a failover).
    A hold that lapsed or was closed cannot come back, and any other error
    would only repeat.
    """
    held = None if lease.reservation is None else lease.reservation.id
    if isinstance(exc, ReservationError):
        log.warning("reservation %s can no longer be renewed: %s", held, exc)
        return False
    if isinstance(exc, BackendUnavailable):
        log.warning("renewing reservation %s failed, will retry: %s", held, exc)
        return True
    # Logged, not raised: the holder's own work must not fail for it, and the
    # hold still settles at the end, late if need be.
    log.error("renewing reservation %s failed; no longer renewed", held, exc_info=exc)
    return False


class _Extends(Protocol):
    async def extend(self, reservation: Reservation, *, ttl: timedelta) -> Reservation: ...


async def renew_until_cancelled(client: _Extends, lease: Lease[Any]) -> None:
    """Renews ``lease`` every :meth:`~Lease.renew_interval` until cancelled or told to stop."""
    ttl = timedelta(milliseconds=lease.ttl_ms)
    while lease.reservation is not None:
        await asyncio.sleep(lease.renew_interval())
        try:
            lease.reservation = await client.extend(lease.reservation, ttl=ttl)
        except Exception as exc:
            if not keep_renewing(exc, lease):
                return


async def stop_renewing(task: asyncio.Task[None]) -> None:
    task.cancel()
    # asyncio.wait, unlike awaiting the task, cannot swallow a cancellation of our own.
    await asyncio.wait({task})


def _check_allow_late(allow_late: object) -> None:
    # Checked before the reservation is made: found only at settle time, it
    # would leave a hold behind.
    if type(allow_late) is not bool:
        raise InvalidInput(f"allow_late must be a bool, not {type(allow_late).__name__}")


class _SyncHolder(Protocol):
    @property
    def engine(self) -> Engine: ...

    def reserve(
        self, account: str | Scope, amount: int, *, ttl: int | timedelta | None, feature: str | None
    ) -> Reservation: ...

    def extend(self, reservation: Reservation, *, ttl: timedelta) -> Reservation: ...

    def settle(self, reservation: Reservation, actual: int, *, allow_late: bool) -> Settlement: ...

    def release(self, reservation: Reservation) -> Settlement: ...


class _AsyncHolder(_Extends, Protocol):
    @property
    def engine(self) -> Engine: ...

    async def reserve(
        self, account: str | Scope, amount: int, *, ttl: int | timedelta | None, feature: str | None
    ) -> Reservation: ...

    async def settle(
        self, reservation: Reservation, actual: int, *, allow_late: bool
    ) -> Settlement: ...

    async def release(self, reservation: Reservation) -> Settlement: ...


class _Block:
    """What both blocks check and keep before the reservation is made."""

    def __init__(
        self,
        engine: Engine,
        account: str | Scope,
        amount: int,
        ttl: int | timedelta | None,
        feature: str | None,
        allow_late: bool,
    ) -> None:
        self._args = (account, amount, ttl, feature)
        self._ttl_ms = engine.ttl_ms(ttl)
        _check_allow_late(allow_late)
        self._allow_late = allow_late
        self.lease: Lease | None = None


class ReservationBlock(_Block):
    """Reserve on entry; renew in a background thread; settle on exit, release on error.

    If the whole process dies, nothing settles or releases: the hold lapses at
    its deadline by itself.
    """

    def __init__(
        self,
        client: _SyncHolder,
        account: str | Scope,
        amount: int,
        ttl: int | timedelta | None,
        feature: str | None,
        allow_late: bool,
    ) -> None:
        super().__init__(client.engine, account, amount, ttl, feature, allow_late)
        self._client = client
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Lease:
        account, amount, ttl, feature = self._args
        reservation = self._client.reserve(account, amount, ttl=ttl, feature=feature)
        self.lease = Lease(reservation, self._ttl_ms)
        self._renewer = threading.Thread(
            target=self._renew, args=(self.lease,), name="redcredit-lease", daemon=True
        )
        self._renewer.start()
        return self.lease

    def _renew(self, lease: Lease) -> None:
        ttl = timedelta(milliseconds=lease.ttl_ms)
        while not self._stop.wait(lease.renew_interval()):
            try:
                lease.reservation = self._client.extend(lease.reservation, ttl=ttl)
            except Exception as exc:
                if not keep_renewing(exc, lease):
                    return

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        lease = self.lease
        if lease is None:
            return
        if exc_type is None:
            lease.settlement = self._client.settle(
                lease.reservation, lease.final_cost(), allow_late=self._allow_late
            )
            return
        try:
            lease.settlement = self._client.release(lease.reservation)
        except RedCreditError as release_error:
            # The hold lapses at its deadline anyway; the body's error matters more.
            log.warning("releasing reservation %s failed: %s", lease.reservation.id, release_error)


class AsyncReservationBlock(_Block):
    """Reserve on entry; renew in a background task; settle on exit, release on error.

    If the whole process dies, nothing settles or releases: the hold lapses at
    its deadline by itself.
    """

    def __init__(
        self,
        client: _AsyncHolder,
        account: str | Scope,
        amount: int,
        ttl: int | timedelta | None,
        feature: str | None,
        allow_late: bool,
    ) -> None:
        super().__init__(client.engine, account, amount, ttl, feature, allow_late)
        self._client = client
        self._renewer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        account, amount, ttl, feature = self._args
        reservation = await self._client.reserve(account, amount, ttl=ttl, feature=feature)
        self.lease = Lease(reservation, self._ttl_ms)
        self._renewer = asyncio.create_task(
            renew_until_cancelled(self._client, self.lease), name="redcredit-lease"
        )
        return self.lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._renewer is not None:
            await stop_renewing(self._renewer)
        lease = self.lease
        if lease is None:
            return
        if exc_type is None:
            lease.settlement = await self._client.settle(
                lease.reservation, lease.final_cost(), allow_late=self._allow_late
            )
            return
        try:
            lease.settlement = await self._client.release(lease.reservation)
        except RedCreditError as release_error:
            # The hold lapses at its deadline anyway; the body's error matters more.
            log.warning("releasing reservation %s failed: %s", lease.reservation.id, release_error)
