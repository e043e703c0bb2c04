"""Reservations: charge an estimate before a call whose cost is known only after it
(an LLM answer's tokens), then settle what it really cost (``/v1/reserve``,
``/v1/settle``, ``/v1/release``).

:class:`Reservation` (sync) and :class:`AsyncReservation` are what
``client.reserve(...)`` gives. Both are context managers that never leave a
reservation open by accident:

- entering a denied reservation raises :class:`ReservationDenied` (with the wait);
- an exception inside the block releases it (the call failed: nothing was used),
  unless it was already settled or released;
- leaving the block normally without settling settles it at its estimate, with a
  warning (the call ran, its real cost was never said).
"""

from __future__ import annotations

import datetime
import logging
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Generator,
    List,
    Optional,
    Sequence,
    Type,
)

from ._models import (
    Check,
    Decision,
    ReservationDenied,
    ReservationNotFound,
    Settlement,
    SluiceError,
    WindowResult,
)

if TYPE_CHECKING:
    from typing import Protocol

    from ._client import SluiceClient

    class AsyncSettler(Protocol):
        """What an :class:`AsyncReservation` settles through (an
        :class:`~sluice_client.AsyncSluiceClient`, or FastAPI's adapter for a sync one)."""

        async def settle(
            self,
            reservation: str,
            cost: Optional[int] = None,
            *,
            costs: Optional[Sequence[int]] = None,
        ) -> Settlement: ...

        async def release(self, reservation: str) -> Settlement: ...


__all__ = ["AsyncReservation", "PendingReservation", "Reservation"]

logger = logging.getLogger("sluice_client")


class _ReservationBase:
    """What sluice answered to ``/v1/reserve``, and whether it was settled since."""

    def __init__(
        self,
        decision: Decision,
        token: Optional[str],
        expires_at_ms: Optional[int],
        checks: Sequence[Check],
        estimates: Sequence[int],
    ) -> None:
        #: The decision, as for ``/v1/check`` (``allowed``, ``results``, ...).
        self.decision = decision
        #: The reservation token: whoever holds it can settle or release the
        #: reservation, so keep it on the server side. ``None`` when nothing is
        #: held: denied, or decided without sluice (``unavailable``).
        self.token = token
        #: When sluice stops holding it (Unix milliseconds); ``None`` when nothing is held.
        self.expires_at_ms = expires_at_ms
        #: The checks reserved, in order (``settle(costs=...)`` follows this order).
        self.checks: List[Check] = list(checks)
        #: What each check was charged: its estimate.
        self.estimates: List[int] = list(estimates)
        #: sluice's answer to the last settle or release, if any.
        self.settlement: Optional[Settlement] = None
        # Set once settle or release was called (even if it failed): the context
        # manager's exit then leaves the reservation alone.
        self._finished = False

    # -- the decision -------------------------------------------------------------

    @property
    def allowed(self) -> bool:
        """Every enforced window admitted the reservation."""
        return self.decision.allowed

    @property
    def retry_after_ms(self) -> Optional[int]:
        """0 when allowed; else the longest wait; ``None`` when it can never fit
        (or sluice was unavailable and the client failed closed)."""
        return self.decision.retry_after_ms

    @property
    def retry_after_seconds(self) -> Optional[int]:
        """``Retry-After`` for this reservation, as :attr:`Decision.retry_after_seconds`."""
        return self.decision.retry_after_seconds

    @property
    def degraded(self) -> bool:
        """Decided without sluice's shared store, or without sluice at all."""
        return self.decision.degraded

    @property
    def unavailable(self) -> bool:
        """Decided by the client's ``on_error`` because sluice could not answer."""
        return self.decision.unavailable

    @property
    def results(self) -> List[WindowResult]:
        """One result per window, as for ``/v1/check``."""
        return self.decision.results

    @property
    def denied_by(self) -> Optional[WindowResult]:
        """The enforced window that denied with the longest wait."""
        return self.decision.denied_by

    @property
    def expires_at(self) -> Optional[datetime.datetime]:
        """When sluice stops holding the reservation (UTC); ``None`` when nothing is held."""
        if self.expires_at_ms is None:
            return None
        return datetime.datetime.fromtimestamp(
            self.expires_at_ms / 1000, tz=datetime.timezone.utc
        )

    @property
    def held(self) -> bool:
        """sluice holds this reservation (it has a token)."""
        return self.token is not None

    @property
    def finished(self) -> bool:
        """``settle`` or ``release`` was called."""
        return self._finished

    def __repr__(self) -> str:
        # No token and no keys: the token is a capability and keys are user data.
        limits = ",".join(c.limit for c in self.checks)
        return (
            f"{type(self).__name__}(allowed={self.allowed}, limits={limits!r}, "
            f"estimates={self.estimates}, expires_at_ms={self.expires_at_ms}, "
            f"finished={self._finished})"
        )

    # -- shared by the sync and async forms -----------------------------------------

    def _limits(self) -> str:
        return ",".join(sorted({c.limit for c in self.checks})) or "-"

    def _require_allowed(self) -> None:
        if not self.allowed:
            raise ReservationDenied(
                self, "this reservation was denied and holds nothing to settle or release"
            )

    def _actual(self, actual: Optional[int], costs: Optional[Sequence[int]]) -> List[int]:
        """The actual cost per check, checked for shape (sluice checks the values)."""
        self._require_allowed()
        if (actual is None) == (costs is None):
            raise ValueError(
                "settle needs either actual (one cost for every check) or "
                "costs=[...] (one per check, in reserve order), not both or neither"
            )
        if costs is None:
            assert actual is not None
            return [actual] * len(self.checks)
        costs = list(costs)
        if len(costs) != len(self.checks):
            raise ValueError(
                f"costs has {len(costs)} entries and the reservation {len(self.checks)} "
                "checks; give one actual cost per check, in the order they were reserved"
            )
        return costs

    def _not_held(self, what: str) -> Settlement:
        """settle/release of an allowed reservation sluice does not hold: a no-op."""
        self._finished = True
        why = (
            "it was allowed without sluice, which was unavailable (on_error)"
            if self.unavailable
            else "it had no checks"
        )
        logger.info("sluice %s skipped: nothing is held, %s; limits=%s", what, why, self._limits())
        self.settlement = Settlement(
            settled=False,
            already_settled=False,
            reservation_id="",
            costs=[],
            unavailable=self.unavailable,
        )
        return self.settlement

    def _enter(self) -> None:
        if not self.allowed:
            raise ReservationDenied(self)

    def _exit_plan(self, exc_type: Optional[Type[BaseException]]) -> Optional[str]:
        """What leaving the block does: ``"release"``, ``"settle"`` or nothing."""
        if self._finished or self.token is None:
            return None
        if exc_type is not None:
            logger.debug(
                "sluice reservation released: the block raised %s; limits=%s",
                exc_type.__name__,
                self._limits(),
            )
            return "release"
        logger.warning(
            "sluice reservation left its block without settle() or release(); settling "
            "it at its estimate %s; limits=%s",
            self.estimates,
            self._limits(),
        )
        return "settle"

    def _exit_failed(self, plan: str, error: SluiceError) -> None:
        """What a failed settle or release on leaving the block does."""
        if plan == "settle" and not isinstance(error, ReservationNotFound):
            # Leaving normally: a sluice that fails (with on_error="raise") is
            # reported like any other call that fails.
            raise error
        # Otherwise leaving must not hide the block's own exception, nor turn a call
        # that worked into an error: the reservation counts at its estimate when it
        # expires, which is what it was charged anyway.
        logger.warning(
            "sluice reservation could not be %s on leaving its block (%s); it counts "
            "at its estimate when it expires; limits=%s",
            "released" if plan == "release" else "settled",
            error,
            self._limits(),
        )


class Reservation(_ReservationBase):
    """A reservation made by :meth:`SluiceClient.reserve <sluice_client.SluiceClient.reserve>`.

    >>> with sluice.reserve([Check("tokens_day", "user:42")], cost=1200) as r:
    ...     answer = call_the_model(max_tokens=1000)
    ...     r.settle(answer.usage.total_tokens)

    Entering raises :class:`ReservationDenied` when it was denied. An exception in
    the block releases it; leaving normally without :meth:`settle` settles it at its
    estimate (with a warning). Without ``with``, check :attr:`allowed` and call
    :meth:`settle` or :meth:`release` yourself.
    """

    def __init__(
        self,
        client: SluiceClient,
        decision: Decision,
        token: Optional[str],
        expires_at_ms: Optional[int],
        checks: Sequence[Check],
        estimates: Sequence[int],
    ) -> None:
        super().__init__(decision, token, expires_at_ms, checks, estimates)
        self._client = client

    def settle(
        self, actual: Optional[int] = None, *, costs: Optional[Sequence[int]] = None
    ) -> Settlement:
        """Says what the call really cost: ``actual`` for every check, or ``costs``
        one per check in reserve order. Each window moves by ``actual - estimate``:
        a refund when less, a charge past the limit (debt) when more.

        Settling again changes nothing (``already_settled``). Raises
        :class:`ReservationNotFound` when sluice no longer holds it (expired), and
        :class:`ReservationDenied` for a denied reservation. When sluice was
        unavailable at reserve time (fail open) it is a logged no-op.
        """
        actual_costs = self._actual(actual, costs)
        if self.token is None:
            return self._not_held("settle")
        self._finished = True
        self.settlement = self._client.settle(self.token, costs=actual_costs)
        return self.settlement

    def release(self) -> Settlement:
        """The call never ran: gives the whole estimate back and frees the slots.

        Same errors as :meth:`settle`; after a settle it changes nothing."""
        self._require_allowed()
        if self.token is None:
            return self._not_held("release")
        self._finished = True
        self.settlement = self._client.release(self.token)
        return self.settlement

    def __enter__(self) -> Reservation:
        self._enter()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        plan = self._exit_plan(exc_type)
        if plan is None:
            return
        try:
            if plan == "release":
                self.release()
            else:
                self.settle(costs=self.estimates)
        except SluiceError as error:
            self._exit_failed(plan, error)


class AsyncReservation(_ReservationBase):
    """A reservation made by :meth:`AsyncSluiceClient.reserve
    <sluice_client.AsyncSluiceClient.reserve>`; the same as :class:`Reservation`
    with awaitable :meth:`settle` and :meth:`release` and ``async with``.

    >>> async with sluice.reserve([Check("tokens_day", "user:42")], cost=1200) as r:
    ...     answer = await call_the_model(max_tokens=1000)
    ...     await r.settle(answer.usage.total_tokens)
    """

    def __init__(
        self,
        client: AsyncSettler,
        decision: Decision,
        token: Optional[str],
        expires_at_ms: Optional[int],
        checks: Sequence[Check],
        estimates: Sequence[int],
    ) -> None:
        super().__init__(decision, token, expires_at_ms, checks, estimates)
        self._client = client

    async def settle(
        self, actual: Optional[int] = None, *, costs: Optional[Sequence[int]] = None
    ) -> Settlement:
        """See :meth:`Reservation.settle`."""
        actual_costs = self._actual(actual, costs)
        if self.token is None:
            return self._not_held("settle")
        self._finished = True
        self.settlement = await self._client.settle(self.token, costs=actual_costs)
        return self.settlement

    async def release(self) -> Settlement:
        """See :meth:`Reservation.release`."""
        self._require_allowed()
        if self.token is None:
            return self._not_held("release")
        self._finished = True
        self.settlement = await self._client.release(self.token)
        return self.settlement

    async def __aenter__(self) -> AsyncReservation:
        self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        plan = self._exit_plan(exc_type)
        if plan is None:
            return
        try:
            if plan == "release":
                await self.release()
            else:
                await self.settle(costs=self.estimates)
        except SluiceError as error:
            self._exit_failed(plan, error)


class PendingReservation:
    """What :meth:`AsyncSluiceClient.reserve <sluice_client.AsyncSluiceClient.reserve>`
    returns: ``await`` it for the :class:`AsyncReservation`, or use it directly as
    ``async with client.reserve(...) as r:``. sluice is called when it is awaited or
    entered, not before."""

    __slots__ = ("_make", "_reservation")

    def __init__(self, make: Callable[[], Awaitable[AsyncReservation]]) -> None:
        self._make = make
        self._reservation: Optional[AsyncReservation] = None

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._make().__await__()

    async def __aenter__(self) -> AsyncReservation:
        self._reservation = await self._make()
        return await self._reservation.__aenter__()

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._reservation is not None:
            await self._reservation.__aexit__(exc_type, exc, tb)
