"""Requests, decisions and errors of sluice's decision API (`POST /v1/check`,
`/v1/reserve`, `/v1/settle`, `/v1/release`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "Check",
    "Decision",
    "ReservationDenied",
    "ReservationNotFound",
    "Settlement",
    "SluiceError",
    "SluiceRequestError",
    "SluiceUnavailable",
    "WindowResult",
    "period_seconds",
]


@dataclass(frozen=True)
class Check:
    """One check of a decision: charge ``cost`` against ``limit`` for ``key``.

    ``cost=None`` takes the decision's top-level cost (1 unless given).
    ``cost=0`` reads the counters without charging.
    """

    limit: str
    key: str
    cost: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"limit": self.limit, "key": self.key}
        if self.cost is not None:
            body["cost"] = self.cost
        return body


@dataclass(frozen=True)
class WindowResult:
    """The answer of one window (a limit with two rates gives two results)."""

    limit: str
    key: str
    rate: str
    allowed: bool
    limit_value: int
    remaining: int
    reset_after_ms: int
    #: Time until this same request would be allowed in this window; ``None``
    #: when the cost can never fit.
    retry_after_ms: Optional[int]
    shadow: bool

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WindowResult:
        retry = data.get("retry_after_ms")
        return cls(
            limit=str(data["limit"]),
            key=str(data["key"]),
            rate=str(data.get("rate", "")),
            allowed=bool(data["allowed"]),
            limit_value=int(data["limit_value"]),
            remaining=int(data["remaining"]),
            reset_after_ms=int(data.get("reset_after_ms", 0)),
            retry_after_ms=None if retry is None else int(retry),
            shadow=bool(data.get("shadow", False)),
        )

    @property
    def period_seconds(self) -> Optional[int]:
        """The window's period in seconds, parsed from ``rate`` (``None`` if unreadable)."""
        return period_seconds(self.rate)


@dataclass(frozen=True)
class Decision:
    """sluice's answer to one ``/v1/check`` call.

    ``degraded`` is true when the decision was made without the shared store
    (sluice's own store-failure policy) *or* without sluice at all (the client's
    ``on_error`` policy); ``unavailable`` is true only in the second case, and
    then ``results`` is empty.
    """

    allowed: bool
    #: 0 when allowed; else the longest wait among the denying windows;
    #: ``None`` when the cost can never fit, or when sluice was unavailable and
    #: the client failed closed (nobody knows when it will be back).
    retry_after_ms: Optional[int]
    degraded: bool
    results: List[WindowResult] = field(default_factory=list)
    unavailable: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decision:
        retry = data.get("retry_after_ms")
        return cls(
            allowed=bool(data["allowed"]),
            retry_after_ms=None if retry is None else int(retry),
            degraded=bool(data.get("degraded", False)),
            results=[WindowResult.from_json(r) for r in data.get("results", [])],
        )

    @property
    def retry_after_seconds(self) -> Optional[int]:
        """``Retry-After`` in whole seconds: 0 when allowed, else rounded up and
        at least 1; ``None`` when the request can never fit (or nobody knows)."""
        if self.allowed:
            return 0
        return retry_after_seconds(self.retry_after_ms)

    @property
    def denied_by(self) -> Optional[WindowResult]:
        """The enforced window that denied with the longest wait (the one
        ``Retry-After`` is about), as sluice's own denial picks it."""
        denying = [r for r in self.results if not r.allowed and not r.shadow]
        if not denying:
            return None
        never = [r for r in denying if r.retry_after_ms is None]
        if never:
            return never[0]
        return max(denying, key=lambda r: r.retry_after_ms or 0)


def retry_after_seconds(retry_after_ms: Optional[int]) -> Optional[int]:
    """Whole seconds, rounded up, at least 1; ``None`` stays ``None``."""
    if retry_after_ms is None:
        return None
    return max(1, math.ceil(max(retry_after_ms, 0) / 1000))


@dataclass(frozen=True)
class Settlement:
    """sluice's answer to ``/v1/settle`` or ``/v1/release``.

    When sluice was not asked, nothing moved: ``settled`` is false and ``costs``
    is empty. ``unavailable`` then says why: true when sluice could not be reached
    now, or was not reached when the reservation was made (allowed by
    ``on_error="allow"``, holding nothing); false for a reservation with no checks.
    A reservation sluice holds that is never settled counts at its estimate once it
    expires.
    """

    #: sluice applied the settlement now or before.
    settled: bool
    #: The reservation had been settled or released before: nothing moved this time.
    already_settled: bool
    #: The reservation's id (not its token): safe to log.
    reservation_id: str
    #: The actual cost of each check, as applied by this call (all 0 for a release);
    #: empty when ``already_settled`` (this call applied nothing).
    costs: List[int]
    unavailable: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Settlement:
        return cls(
            settled=bool(data["settled"]),
            already_settled=bool(data.get("already_settled", False)),
            reservation_id=str(data.get("reservation_id", "")),
            costs=[int(c) for c in data.get("costs", [])],
        )


_RATE = re.compile(r"^\s*\d+\s*/\s*(\d*)\s*([A-Za-z]+)\s*$")
_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}


def period_seconds(rate: str) -> Optional[int]:
    """The period of a rate such as ``5/minute`` or ``100/10s``, in seconds."""
    match = _RATE.match(rate)
    if not match:
        return None
    unit = _UNITS.get(match.group(2).lower())
    if unit is None:
        return None
    multiplier = int(match.group(1)) if match.group(1) else 1
    return multiplier * unit


class SluiceError(Exception):
    """Base class of this package's errors."""


class SluiceRequestError(SluiceError):
    """sluice refused the request as malformed (a 4xx such as ``400 unknown_limit``).

    Bad input is a bug in the caller, so it is never turned into an allowed
    decision, whatever ``on_error`` says.
    """

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"sluice answered {status} {error}: {message}")
        self.status = status
        self.error = error
        self.message = message


class SluiceUnavailable(SluiceError):
    """sluice could not be reached, timed out, answered 5xx or gibberish.

    Raised by ``check`` only with ``on_error="raise"``.
    """

    def __init__(self, reason: str, *, status: Optional[int] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ReservationNotFound(SluiceRequestError):
    """``404 unknown_reservation``: sluice holds no open reservation for this token.

    It expired (a reservation never settled counts at its estimate once its ``ttl``
    has passed: reserve with a longer ``ttl`` for calls that take longer), was made
    against another store, or the token was changed. ``message`` says which.
    """


class ReservationDenied(SluiceError):
    """A reservation that was not allowed was entered with ``with`` / ``async with``
    (or settled, or released: a denied reservation holds nothing).

    ``reservation`` is the denied reservation; ``retry_after_ms`` and
    ``retry_after_seconds`` say when the same reservation would be allowed
    (``None`` when it can never fit, or when sluice was unavailable and the client
    failed closed: then ``unavailable`` is true).
    """

    def __init__(self, reservation: Any, message: Optional[str] = None) -> None:
        decision: Decision = reservation.decision
        window = decision.denied_by
        if message is None:
            if decision.unavailable:
                message = "sluice is unavailable and on_error='deny': the reservation is denied"
            elif decision.retry_after_ms is None:
                limit = window.limit if window is not None else "the limit"
                message = f"the reservation's cost is more than {limit} can ever allow"
            else:
                limit = window.limit if window is not None else "a limit"
                message = (
                    f"reservation denied by {limit}; retry in "
                    f"{decision.retry_after_seconds} s ({decision.retry_after_ms} ms)"
                )
        super().__init__(message)
        self.reservation = reservation
        self.decision = decision
        self.retry_after_ms: Optional[int] = decision.retry_after_ms
        self.retry_after_seconds: Optional[int] = retry_after_seconds(decision.retry_after_ms)
        self.unavailable = decision.unavailable
        self.limit: Optional[str] = window.limit if window is not None else None


def allowed_without_checks() -> Decision:
    """What a decision with no checks (every key skipped) looks like."""
    return Decision(allowed=True, retry_after_ms=0, degraded=False, results=[])


def checks_to_json(
    checks: Sequence[Check], cost: Optional[int], dry_run: bool
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"checks": [c.to_json() for c in checks]}
    if cost is not None:
        body["cost"] = cost
    if dry_run:
        body["dry_run"] = True
    return body


def estimates(checks: Sequence[Check], cost: Optional[int]) -> List[int]:
    """What each check of a reservation charges, as sluice resolves it: its own
    ``cost``, else the top-level ``cost``, else 1."""
    default = 1 if cost is None else cost
    return [default if c.cost is None else c.cost for c in checks]
