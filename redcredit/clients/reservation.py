"""Reservation blocks: reserve on entry, renew while the body runs, settle or release on exit.

The sync block renews from a thread, the async one from a task; what the body
reported lives in a shared :class:`~redcredit.clients.lease.Lease`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import BackendUnavailable, InvalidInput, RedCreditError, ReservationError
from .lease import Lease

if TYPE_CHECKING:
    from .async_client import AsyncRedCredit
    from .sync_client import RedCredit

__all__ = ["AsyncReservationBlock", "ReservationBlock"]

log = logging.getLogger("redcredit")


def _check_allow_late(allow_late: object) -> None:
    # Checked before the reservation is made: found only at settle time, it
    # would leave a hold behind.
    if type(allow_late) is not bool:
        raise InvalidInput(f"allow_late must be a bool, not {type(allow_late).__name__}")


class ReservationBlock:
    """Reserve on entry; renew in a background thread; settle on exit, release on error.

    If the whole process dies, nothing settles or releases: the hold lapses at
    its deadline by itself.
    """

    def __init__(
        self,
        client: RedCredit,
        account: str,
        amount: int,
        ttl: int | timedelta | None,
        feature: str | None,
        allow_late: bool,
    ) -> None:
        self._client = client
        self._args = (account, amount, ttl, feature)
        self._ttl_ms = client.engine.ttl_ms(ttl)
        _check_allow_late(allow_late)
        self._lease_ttl = timedelta(milliseconds=self._ttl_ms)
        self._allow_late = allow_late
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lease: Lease | None = None

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
        while not self._stop.wait(lease.renew_interval()):
            try:
                lease.reservation = self._client.extend(lease.reservation, ttl=self._lease_ttl)
            except ReservationError as exc:
                log.warning(
                    "reservation %s can no longer be renewed: %s", lease.reservation.id, exc
                )
                return
            except BackendUnavailable as exc:
                log.warning(
                    "renewing reservation %s failed, will retry: %s", lease.reservation.id, exc
                )

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


class AsyncReservationBlock:
    """Reserve on entry; renew in a background task; settle on exit, release on error.

    If the whole process dies, nothing settles or releases: the hold lapses at
    its deadline by itself.
    """

    def __init__(
        self,
        client: AsyncRedCredit,
        account: str,
        amount: int,
        ttl: int | timedelta | None,
        feature: str | None,
        allow_late: bool,
    ) -> None:
        self._client = client
        self._args = (account, amount, ttl, feature)
        self._ttl_ms = client.engine.ttl_ms(ttl)
        _check_allow_late(allow_late)
        self._lease_ttl = timedelta(milliseconds=self._ttl_ms)
        self._allow_late = allow_late
        self._renewer: asyncio.Task[None] | None = None
        self.lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        account, amount, ttl, feature = self._args
        reservation = await self._client.reserve(account, amount, ttl=ttl, feature=feature)
        self.lease = Lease(reservation, self._ttl_ms)
        self._renewer = asyncio.create_task(self._renew(self.lease), name="redcredit-lease")
        return self.lease

    async def _renew(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(lease.renew_interval())
            try:
                lease.reservation = await self._client.extend(
                    lease.reservation, ttl=self._lease_ttl
                )
            except ReservationError as exc:
                log.warning(
                    "reservation %s can no longer be renewed: %s", lease.reservation.id, exc
                )
                return
            except BackendUnavailable as exc:
                log.warning(
                    "renewing reservation %s failed, will retry: %s", lease.reservation.id, exc
                )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
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
