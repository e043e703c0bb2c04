"""Sync and async clients for sluice's ``POST /v1/check`` and reservations
(``/v1/reserve``, ``/v1/settle``, ``/v1/release``)."""

from __future__ import annotations

import datetime
import json
import logging
import math
from types import TracebackType
from typing import (
    Any,
    Callable,
    Dict,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import httpx

from ._models import (
    Check,
    Decision,
    ReservationNotFound,
    Settlement,
    SluiceRequestError,
    SluiceUnavailable,
    checks_to_json,
    estimates,
)
from ._reservation import AsyncReservation, PendingReservation, Reservation, _ReservationBase

__all__ = ["AsyncSluiceClient", "OnError", "SluiceClient"]

logger = logging.getLogger("sluice_client")

#: What a client does when sluice is unreachable, times out or answers 5xx.
OnError = Literal["allow", "deny", "raise"]
_ON_ERROR = ("allow", "deny", "raise")

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 0.5

#: How long a reservation stays open: seconds, or a ``timedelta``.
TTL = Union[float, datetime.timedelta]

T = TypeVar("T")
#: What ``/v1/reserve`` answered: the decision, the token and its expiry.
Reserved = Tuple[Decision, Optional[str], Optional[int]]


class _Base:
    def __init__(
        self,
        base_url: str,
        timeout: Union[float, httpx.Timeout, None],
        on_error: OnError,
    ) -> None:
        if on_error not in _ON_ERROR:
            raise ValueError(
                f"on_error must be 'allow', 'deny' or 'raise', not {on_error!r}"
            )
        self.base_url = base_url.rstrip("/")
        self.on_error: OnError = on_error
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._check_url = self.base_url + "/v1/check"
        self._reserve_url = self.base_url + "/v1/reserve"
        self._settle_url = self.base_url + "/v1/settle"
        self._release_url = self.base_url + "/v1/release"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, "
            f"on_error={self.on_error!r})"
        )

    @staticmethod
    def _checks(checks: Sequence[Check]) -> Sequence[Check]:
        if isinstance(checks, Check):  # a common slip: check(Check(...))
            return [checks]
        return checks

    @staticmethod
    def _interpret(response: httpx.Response) -> Decision:
        return _Base._answer(response, Decision.from_json, "a decision")

    @staticmethod
    def _answer(response: httpx.Response, parse: Callable[[Any], T], what: str) -> T:
        """``parse`` of a 200 answer; a 4xx raises :class:`SluiceRequestError`
        (:class:`ReservationNotFound` for ``unknown_reservation``), a 5xx or a 200
        that ``parse`` refuses raises :class:`SluiceUnavailable`."""
        status = response.status_code
        if status == 200:
            try:
                return parse(response.json())
            except (ValueError, KeyError, TypeError) as exc:
                raise SluiceUnavailable(
                    f"sluice answered 200 with a body that is not {what}: {exc}",
                    status=status,
                ) from exc
        if 400 <= status < 500:
            error, message = f"http_{status}", response.text[:500]
            try:
                body = response.json()
                if isinstance(body, dict):
                    error = str(body.get("error", error))
                    message = str(body.get("message", message))
            except ValueError:
                pass
            if error == "unknown_reservation":
                raise ReservationNotFound(status, error, message)
            raise SluiceRequestError(status, error, message)
        code = ""
        try:
            body = response.json()
            if isinstance(body, dict) and "error" in body:
                code = f" {body['error']}"
        except ValueError:
            pass
        raise SluiceUnavailable(f"sluice answered {status}{code}", status=status)

    def _transport_error(self, exc: httpx.HTTPError) -> SluiceUnavailable:
        if isinstance(exc, httpx.TimeoutException):
            reason = f"timed out talking to {self.base_url} ({type(exc).__name__})"
        else:
            reason = f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})"
        return SluiceUnavailable(reason)

    def _unavailable(self, exc: SluiceUnavailable, checks: Sequence[Check]) -> Decision:
        # Limit names only: keys are user ids, IPs, API keys and stay out of logs.
        limits = ",".join(sorted({c.limit for c in checks})) or "-"
        logger.warning(
            "sluice unavailable: %s; on_error=%s, limits=%s",
            exc.reason,
            self.on_error,
            limits,
        )
        if self.on_error == "raise":
            raise exc
        if self.on_error == "allow":
            return Decision(
                allowed=True,
                retry_after_ms=0,
                degraded=True,
                results=[],
                unavailable=True,
            )
        return Decision(
            allowed=False,
            retry_after_ms=None,
            degraded=True,
            results=[],
            unavailable=True,
        )


    # -- reservations -------------------------------------------------------------

    @staticmethod
    def _reserve_body(
        checks: Sequence[Check], cost: Optional[int], ttl: Optional[TTL]
    ) -> Dict[str, Any]:
        body = checks_to_json(checks, cost, False)
        if ttl is not None:
            seconds = ttl.total_seconds() if isinstance(ttl, datetime.timedelta) else ttl
            # Rounded up, so a ttl is never shorter than asked; sluice checks the range.
            body["ttl_ms"] = math.ceil(seconds * 1000)
        return body

    @staticmethod
    def _reserved(data: Any) -> Reserved:
        decision = Decision.from_json(data)
        token = data.get("reservation")
        if not decision.allowed:
            return decision, None, None
        if not isinstance(token, str) or not token:
            raise TypeError("an allowed reservation without a reservation token")
        return decision, token, int(data["expires_at_ms"])

    def _reserve_unavailable(self, exc: SluiceUnavailable, checks: Sequence[Check]) -> Reserved:
        return self._unavailable(exc, checks), None, None

    @staticmethod
    def _settle_body(
        token: str, cost: Optional[int], costs: Optional[Sequence[int]]
    ) -> Dict[str, Any]:
        body = _Base._release_body(token)
        if (cost is None) == (costs is None):
            raise ValueError(
                "settle needs either cost (one actual cost for every check) or "
                "costs=[...] (one per check, in reserve order), not both or neither"
            )
        if costs is not None:
            body["costs"] = list(costs)
        else:
            body["cost"] = cost
        return body

    @staticmethod
    def _release_body(token: str) -> Dict[str, Any]:
        if isinstance(token, _ReservationBase):
            raise TypeError("pass reservation.token, or call reservation.settle() itself")
        return {"reservation": token}

    def _settle_unavailable(self, exc: SluiceUnavailable, what: str) -> Settlement:
        logger.warning(
            "sluice unavailable: %s; on_error=%s; the reservation was not %s and "
            "counts at its estimate once it expires",
            exc.reason,
            self.on_error,
            what,
        )
        if self.on_error == "raise":
            raise exc
        return Settlement(
            settled=False, already_settled=False, reservation_id="", costs=[], unavailable=True
        )


class SluiceClient(_Base):
    """A blocking client for sluice's decision API.

    ``timeout`` (seconds) applies to each of connecting, writing, reading and
    waiting for a pooled connection, as in httpx. ``on_error`` decides what
    :meth:`check` returns when sluice is unreachable, times out or answers 5xx:

    - ``"allow"`` (fail open): ``Decision(allowed=True, degraded=True, unavailable=True)``
    - ``"deny"`` (fail closed): ``Decision(allowed=False, retry_after_ms=None,
      degraded=True, unavailable=True)``
    - ``"raise"``: :class:`SluiceUnavailable`

    A 4xx answer (bad input) always raises :class:`SluiceRequestError`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        timeout: Union[float, httpx.Timeout, None] = DEFAULT_TIMEOUT,
        on_error: OnError = "allow",
        *,
        headers: Optional[Mapping[str, str]] = None,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        super().__init__(base_url, timeout, on_error)
        self._http = httpx.Client(
            timeout=self.timeout, headers=dict(headers or {}), transport=transport
        )

    def check(
        self,
        checks: Sequence[Check],
        cost: Optional[int] = None,
        dry_run: bool = False,
    ) -> Decision:
        """Decide ``checks`` together, atomically, in one call."""
        checks = self._checks(checks)
        body = checks_to_json(checks, cost, dry_run)
        try:
            try:
                response = self._http.post(self._check_url, content=_dumps(body), headers=_JSON)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            return self._interpret(response)
        except SluiceUnavailable as exc:
            return self._unavailable(exc, checks)

    def check_one(
        self, limit: str, key: str, cost: int = 1, dry_run: bool = False
    ) -> Decision:
        """Decide one check."""
        return self.check([Check(limit, key, cost)], dry_run=dry_run)

    def reserve(
        self,
        checks: Sequence[Check],
        cost: Optional[int] = None,
        *,
        ttl: Optional[TTL] = None,
    ) -> Reservation:
        """Charges an estimate for a call whose real cost is known only after it.

        ``checks`` and ``cost`` are as for :meth:`check` (each check's ``cost`` is its
        estimate); ``ttl`` (seconds or a ``timedelta``, default sluice's 60 s, at most
        a day) is how long sluice holds the reservation: one never settled counts at
        its estimate after it. Limits with ``concurrency: N`` hold one slot until
        the reservation is settled, released or expires.

        Returns a :class:`~sluice_client.Reservation`: check ``allowed``, then
        ``settle(actual)`` or ``release()``; or use it as a context manager
        (``with client.reserve(...) as r:``), which raises
        :class:`~sluice_client.ReservationDenied` when denied, releases on an
        exception and settles at the estimate when left unsettled. While sluice is
        unavailable ``on_error`` applies as for :meth:`check`; a reservation
        allowed that way holds nothing and its settle/release do nothing.
        """
        checks = self._checks(checks)
        body = self._reserve_body(checks, cost, ttl)
        try:
            try:
                response = self._http.post(self._reserve_url, content=_dumps(body), headers=_JSON)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            decision, token, expires = self._answer(response, self._reserved, "a reservation")
        except SluiceUnavailable as exc:
            decision, token, expires = self._reserve_unavailable(exc, checks)
        return Reservation(self, decision, token, expires, checks, estimates(checks, cost))

    def reserve_one(
        self, limit: str, key: str, cost: int = 1, *, ttl: Optional[TTL] = None
    ) -> Reservation:
        """Reserves ``cost`` of one limit for one key (see :meth:`reserve`)."""
        return self.reserve([Check(limit, key, cost)], ttl=ttl)

    def settle(
        self,
        token: str,
        cost: Optional[int] = None,
        *,
        costs: Optional[Sequence[int]] = None,
    ) -> Settlement:
        """Settles the reservation ``token`` (from any process) at what the call
        really cost: ``cost`` for every check, or ``costs`` one per check in reserve
        order. Usually called as ``reservation.settle(actual)``.

        Idempotent: settling again changes nothing and answers ``already_settled``.
        Raises :class:`~sluice_client.ReservationNotFound` when sluice holds no such
        reservation (expired: it counted at its estimate). While sluice is unavailable:
        ``on_error="raise"`` raises :class:`SluiceUnavailable`, otherwise it is logged
        and answered ``Settlement(unavailable=True)``.
        """
        body = self._settle_body(token, cost, costs)
        return self._post_settlement(self._settle_url, body, "settled")

    def release(self, token: str) -> Settlement:
        """The call never ran: gives the reservation's whole estimate back and frees
        its slots. Errors as :meth:`settle`; after a settle it changes nothing."""
        body = self._release_body(token)
        return self._post_settlement(self._release_url, body, "released")

    def _post_settlement(self, url: str, body: Dict[str, Any], what: str) -> Settlement:
        try:
            try:
                response = self._http.post(url, content=_dumps(body), headers=_JSON)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            return self._answer(response, Settlement.from_json, "a settlement")
        except SluiceUnavailable as exc:
            return self._settle_unavailable(exc, what)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SluiceClient:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class AsyncSluiceClient(_Base):
    """The asyncio version of :class:`SluiceClient` (same arguments, same answers)."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        timeout: Union[float, httpx.Timeout, None] = DEFAULT_TIMEOUT,
        on_error: OnError = "allow",
        *,
        headers: Optional[Mapping[str, str]] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        super().__init__(base_url, timeout, on_error)
        self._http = httpx.AsyncClient(
            timeout=self.timeout, headers=dict(headers or {}), transport=transport
        )

    async def check(
        self,
        checks: Sequence[Check],
        cost: Optional[int] = None,
        dry_run: bool = False,
    ) -> Decision:
        """Decide ``checks`` together, atomically, in one call."""
        checks = self._checks(checks)
        body = checks_to_json(checks, cost, dry_run)
        try:
            try:
                response = await self._http.post(
                    self._check_url, content=_dumps(body), headers=_JSON
                )
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            return self._interpret(response)
        except SluiceUnavailable as exc:
            return self._unavailable(exc, checks)

    async def check_one(
        self, limit: str, key: str, cost: int = 1, dry_run: bool = False
    ) -> Decision:
        """Decide one check."""
        return await self.check([Check(limit, key, cost)], dry_run=dry_run)

    def reserve(
        self,
        checks: Sequence[Check],
        cost: Optional[int] = None,
        *,
        ttl: Optional[TTL] = None,
    ) -> PendingReservation:
        """See :meth:`SluiceClient.reserve`. ``await`` it for the
        :class:`~sluice_client.AsyncReservation`, or enter it directly:
        ``async with client.reserve(...) as r: ...; await r.settle(actual)``."""
        checks = self._checks(checks)
        body = self._reserve_body(checks, cost, ttl)

        async def make() -> AsyncReservation:
            try:
                try:
                    response = await self._http.post(
                        self._reserve_url, content=_dumps(body), headers=_JSON
                    )
                except httpx.HTTPError as exc:
                    raise self._transport_error(exc) from exc
                decision, token, expires = self._answer(
                    response, self._reserved, "a reservation"
                )
            except SluiceUnavailable as exc:
                decision, token, expires = self._reserve_unavailable(exc, checks)
            return AsyncReservation(
                self, decision, token, expires, checks, estimates(checks, cost)
            )

        return PendingReservation(make)

    def reserve_one(
        self, limit: str, key: str, cost: int = 1, *, ttl: Optional[TTL] = None
    ) -> PendingReservation:
        """Reserves ``cost`` of one limit for one key (see :meth:`reserve`)."""
        return self.reserve([Check(limit, key, cost)], ttl=ttl)

    async def settle(
        self,
        token: str,
        cost: Optional[int] = None,
        *,
        costs: Optional[Sequence[int]] = None,
    ) -> Settlement:
        """See :meth:`SluiceClient.settle`."""
        body = self._settle_body(token, cost, costs)
        return await self._post_settlement(self._settle_url, body, "settled")

    async def release(self, token: str) -> Settlement:
        """See :meth:`SluiceClient.release`."""
        body = self._release_body(token)
        return await self._post_settlement(self._release_url, body, "released")

    async def _post_settlement(self, url: str, body: Dict[str, Any], what: str) -> Settlement:
        try:
            try:
                response = await self._http.post(url, content=_dumps(body), headers=_JSON)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            return self._answer(response, Settlement.from_json, "a settlement")
        except SluiceUnavailable as exc:
            return self._settle_unavailable(exc, what)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSluiceClient:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.aclose()


_JSON = {"content-type": "application/json"}


def _dumps(body: Dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
