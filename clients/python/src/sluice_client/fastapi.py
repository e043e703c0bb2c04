"""FastAPI dependencies for sluice: ``Depends(limit("chat_user", key=...))``.

Needs FastAPI (``pip install sluice-client[fastapi]``); the rest of the package
does not import this module.

- :func:`limit` / :func:`limits` (or :meth:`Limiter.limit` / :meth:`Limiter.limits`)
  build dependencies that charge sluice before the endpoint runs.
- :meth:`Limiter.hit` charges from inside an endpoint, for the staged pattern:
  the per-IP layer before an API key is validated, the per-key layer only once the
  key is known to be real.
- :meth:`Limiter.reserve` reserves an estimate inside an endpoint for a call whose
  cost is known only after it (``async with limiter.reserve(...) as r: ...;
  await r.settle(actual)``); :meth:`Limiter.reservation` does it in a dependency.
- A denial raises :class:`RateLimited` (an ``HTTPException``); after
  :func:`install` (or :meth:`Limiter.install`) it is answered ``429`` with
  ``Retry-After`` and sluice's own denial body.
- :func:`client_ip` and :class:`ClientIP` turn a request into a per-IP key.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import math
import os
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

try:
    from fastapi import FastAPI, HTTPException, Request, Response
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError(
        "sluice_client.fastapi needs FastAPI: pip install 'sluice-client[fastapi]'"
    ) from exc

from ._client import DEFAULT_BASE_URL, TTL, AsyncSluiceClient, SluiceClient
from ._models import Check, Decision, Settlement, allowed_without_checks, period_seconds
from ._reservation import AsyncReservation, PendingReservation

__all__ = [
    "ClientIP",
    "CostFunc",
    "KeyFunc",
    "Limiter",
    "RateLimited",
    "client_ip",
    "install",
    "limit",
    "limits",
    "rate_limit_headers",
    "rate_limited_handler",
]

#: Maps a request to a key; ``None`` skips the check. May be async.
KeyFunc = Callable[[Request], Union[Optional[str], Awaitable[Optional[str]]]]
#: ``(limit, key_func)`` or ``(limit, key_func, cost)``.
LimitSpec = Union[Tuple[str, KeyFunc], Tuple[str, KeyFunc, int]]
AnyClient = Union[SluiceClient, AsyncSluiceClient]
Dependency = Callable[[Request, Response], Awaitable[Decision]]
#: Maps a request to a reservation's estimate. May be async.
CostFunc = Callable[[Request], Union[int, Awaitable[int]]]
ReservationDependency = Callable[[Request, Response], AsyncIterator[AsyncReservation]]

MAX_KEY_BYTES = 512


class RateLimited(HTTPException):
    """A denial (or a fail-closed answer while sluice is unavailable).

    ``body`` is the JSON body, ``headers`` has ``Retry-After`` and the rate-limit
    headers, ``decision`` is sluice's decision. Without :func:`install` FastAPI
    answers it like any ``HTTPException``: the same status and headers, with the
    body under ``{"detail": ...}``.
    """

    def __init__(
        self,
        decision: Decision,
        body: Dict[str, Any],
        status_code: int = 429,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=body, headers=headers)
        self.decision = decision
        self.body = body


async def rate_limited_handler(request: Request, exc: Exception) -> Response:
    """Answers :class:`RateLimited` with its own body (no ``detail`` wrapper)."""
    assert isinstance(exc, RateLimited)
    return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)


def install(app: FastAPI) -> None:
    """Registers :func:`rate_limited_handler` for :class:`RateLimited` on ``app``."""
    app.add_exception_handler(RateLimited, rate_limited_handler)


def rate_limit_headers(decision: Decision) -> Dict[str, str]:
    """``RateLimit-Policy`` and ``RateLimit`` (IETF draft) for ``decision``, as
    sluice's forward-auth writes them: one item per window, a limit with several
    rates named ``chat_user-60s``, ``chat_user-3600s``."""
    if not decision.results:
        return {}
    rates: Dict[str, set[str]] = {}
    for r in decision.results:
        rates.setdefault(r.limit, set()).add(r.rate)
    policy: List[str] = []
    state: List[str] = []
    for r in decision.results:
        period = period_seconds(r.rate)
        name = r.limit
        if len(rates[r.limit]) > 1 and period is not None:
            name = f"{r.limit}-{period}s"
        window = f";w={period}" if period is not None else ""
        policy.append(f'"{name}";q={r.limit_value}{window}')
        state.append(f'"{name}";r={r.remaining};t={math.ceil(max(r.reset_after_ms, 0) / 1000)}')
    return {"RateLimit-Policy": ", ".join(policy), "RateLimit": ", ".join(state)}


class Limiter:
    """Ties a sluice client to FastAPI.

    - ``client``: a :class:`~sluice_client.AsyncSluiceClient` (best) or a
      :class:`~sluice_client.SluiceClient` (called in the thread pool). Its
      ``on_error`` decides what happens while sluice is unavailable: ``"allow"``
      lets requests through, ``"deny"`` answers ``unavailable_status`` (503) with
      ``Retry-After: unavailable_retry_after``, ``"raise"`` lets
      :class:`~sluice_client.SluiceUnavailable` propagate (a 500 unless you handle it).
    - ``deny_status``: the status of a denial (429).
    - ``headers``: add ``RateLimit``/``RateLimit-Policy`` to allowed responses (when the
      endpoint returns data rather than a ``Response``) and to denials.
    """

    def __init__(
        self,
        client: Optional[AnyClient] = None,
        *,
        deny_status: int = 429,
        unavailable_status: int = 503,
        unavailable_retry_after: int = 5,
        headers: bool = True,
    ) -> None:
        self.client: AnyClient = client if client is not None else AsyncSluiceClient(
            os.environ.get("SLUICE_URL", DEFAULT_BASE_URL)
        )
        self.deny_status = deny_status
        self.unavailable_status = unavailable_status
        self.unavailable_retry_after = max(1, int(unavailable_retry_after))
        self.headers = headers

    def install(self, app: FastAPI) -> None:
        """Same as :func:`install`."""
        install(app)

    # -- deciding ---------------------------------------------------------------

    async def check(
        self, checks: Sequence[Check], cost: Optional[int] = None, dry_run: bool = False
    ) -> Decision:
        """The client's decision, without raising on a denial. No checks: allowed."""
        if not checks:
            return allowed_without_checks()
        if isinstance(self.client, AsyncSluiceClient):
            return await self.client.check(checks, cost=cost, dry_run=dry_run)
        return await run_in_threadpool(self.client.check, checks, cost, dry_run)

    async def hit(
        self,
        limit: str,
        key: Optional[str],
        cost: int = 1,
        *,
        response: Optional[Response] = None,
    ) -> Decision:
        """Charges ``cost`` to ``limit`` for ``key`` and raises :class:`RateLimited`
        when denied. ``key=None`` skips the check. Pass the endpoint's ``response``
        to get the rate-limit headers on an allowed answer."""
        if key is None:
            return allowed_without_checks()
        return await self.hit_many([Check(limit, key, cost)], response=response)

    async def hit_many(
        self, checks: Sequence[Check], *, response: Optional[Response] = None
    ) -> Decision:
        """Decides ``checks`` atomically in one call; raises :class:`RateLimited` when denied."""
        checks = [Check(c.limit, safe_key(c.key), c.cost) for c in checks]
        decision = await self.check(checks)
        self.raise_for(decision, checks)
        if response is not None and self.headers:
            _merge_headers(response, rate_limit_headers(decision))
        return decision

    def raise_for(self, decision: Decision, checks: Sequence[Check] = ()) -> None:
        """Raises :class:`RateLimited` when ``decision`` is a denial."""
        if decision.allowed:
            return
        if decision.unavailable:
            limit = checks[0].limit if checks else ""
            seconds = self.unavailable_retry_after
            body: Dict[str, Any] = {
                "error": "rate_limiter_unavailable",
                "message": f"Rate limiting is unavailable; retry in {_seconds(seconds)}.",
                "limit": limit,
                "retry_after_seconds": seconds,
            }
            raise RateLimited(
                decision, body, self.unavailable_status, {"Retry-After": str(seconds)}
            )
        window = decision.denied_by
        limit = window.limit if window is not None else ""
        seconds_or_none = decision.retry_after_seconds
        if seconds_or_none is None:
            message = f"This request costs more than {limit} can ever allow."
        else:
            message = f"Too many requests for {limit}; retry in {_seconds(seconds_or_none)}."
        body = {
            "error": "rate_limited",
            "message": message,
            "limit": limit,
            "retry_after_seconds": seconds_or_none,
        }
        headers: Dict[str, str] = {}
        if seconds_or_none is not None:
            headers["Retry-After"] = str(seconds_or_none)
        if self.headers:
            headers.update(rate_limit_headers(decision))
        raise RateLimited(decision, body, self.deny_status, headers)

    def reserve(
        self,
        checks: Sequence[Check],
        cost: Optional[int] = None,
        *,
        ttl: Optional[TTL] = None,
        response: Optional[Response] = None,
    ) -> PendingReservation:
        """Reserves an estimate from inside an endpoint, for a call whose cost is
        known only after it::

            async with limiter.reserve([Check("tokens_day", f"user:{user}")], cost=estimate) as r:
                completion = await llm.chat.completions.create(...)
                await r.settle(completion.usage.total_tokens)

        A denial raises :class:`RateLimited` (429 with ``Retry-After``; 503 while
        sluice is unavailable with ``on_error="deny"``), as :meth:`hit` does. The
        :class:`~sluice_client.AsyncReservation` releases on an exception in the
        block and settles at the estimate (with a warning) when left unsettled.
        Keys over 512 bytes are hashed; no checks at all is allowed and holds
        nothing. Pass the endpoint's ``response`` to get the rate-limit headers."""
        checks = [Check(c.limit, safe_key(c.key), c.cost) for c in checks]
        client = self.client

        async def make() -> AsyncReservation:
            if not checks:
                reservation = AsyncReservation(
                    _settler(client), allowed_without_checks(), None, None, [], []
                )
            elif isinstance(client, AsyncSluiceClient):
                reservation = await client.reserve(checks, cost, ttl=ttl)
            else:
                held = await run_in_threadpool(client.reserve, checks, cost, ttl=ttl)
                reservation = AsyncReservation(
                    _ThreadedSettler(client),
                    held.decision,
                    held.token,
                    held.expires_at_ms,
                    held.checks,
                    held.estimates,
                )
            self.raise_for(reservation.decision, checks)
            if response is not None and self.headers:
                _merge_headers(response, rate_limit_headers(reservation.decision))
            return reservation

        return PendingReservation(make)

    # -- dependencies -------------------------------------------------------------

    def limit(self, limit: str, key: KeyFunc, cost: int = 1) -> Dependency:
        """A dependency charging ``cost`` to ``limit`` for ``key(request)``."""
        return self.limits([(limit, key, cost)])

    def limits(self, specs: Iterable[LimitSpec]) -> Dependency:
        """A dependency deciding several limits atomically in one sluice call:
        ``limits([("chat_user", user_key), ("chat_ip", client_ip)])``. A key
        function returning ``None`` drops its check; if all do, nothing is charged."""
        resolved: List[Tuple[str, KeyFunc, int]] = []
        for spec in specs:
            if len(spec) == 2:
                resolved.append((spec[0], spec[1], 1))
            else:
                resolved.append((spec[0], spec[1], spec[2]))
        names = "_".join(name for name, _, _ in resolved)

        async def dependency(request: Request, response: Response) -> Decision:
            checks: List[Check] = []
            for name, key_func, cost in resolved:
                key = await _call_key(key_func, request)
                if key is not None:
                    checks.append(Check(name, key, cost))
            return await self.hit_many(checks, response=response)

        dependency.__name__ = f"sluice_limit_{names}"
        dependency.__qualname__ = dependency.__name__
        return dependency

    def reservation(
        self,
        specs: Iterable[LimitSpec],
        *,
        cost: Union[int, CostFunc, None] = None,
        ttl: Optional[TTL] = None,
    ) -> ReservationDependency:
        """A dependency that reserves before the endpoint and finishes the
        reservation after it: ``r: AsyncReservation = Depends(limiter.reservation(
        [("tokens_day", user_key)], cost=estimate_from_request))``; the endpoint
        calls ``await r.settle(actual)``.

        ``cost`` is the estimate of checks given as ``(limit, key)`` (a number, or a
        function of the request, may be async); ``(limit, key, cost)`` fixes a
        check's own. Denials raise :class:`RateLimited` as :meth:`reserve`. When the
        endpoint raises, the reservation is released; when it returns without
        settling, it is settled at the estimate with a warning. (Before FastAPI
        0.106 an ``HTTPException`` from the endpoint was answered before the
        dependency saw it, so it was settled at the estimate rather than released.)"""
        resolved: List[Tuple[str, KeyFunc, Optional[int]]] = []
        for spec in specs:
            if len(spec) == 2:
                resolved.append((spec[0], spec[1], None))
            else:
                resolved.append((spec[0], spec[1], spec[2]))
        names = "_".join(name for name, _, _ in resolved)

        async def dependency(request: Request, response: Response) -> AsyncIterator[AsyncReservation]:
            checks: List[Check] = []
            for name, key_func, own_cost in resolved:
                key = await _call_key(key_func, request)
                if key is not None:
                    checks.append(Check(name, key, own_cost))
            estimate = await _call_cost(cost, request)
            async with self.reserve(checks, estimate, ttl=ttl, response=response) as held:
                yield held

        dependency.__name__ = f"sluice_reservation_{names}"
        dependency.__qualname__ = dependency.__name__
        return dependency


class _ThreadedSettler:
    """Settles through a sync :class:`~sluice_client.SluiceClient` in the thread pool,
    so an :class:`~sluice_client.AsyncReservation` can be awaited in an endpoint."""

    def __init__(self, client: SluiceClient) -> None:
        self._client = client

    async def settle(
        self,
        reservation: str,
        cost: Optional[int] = None,
        *,
        costs: Optional[Sequence[int]] = None,
    ) -> Settlement:
        return await run_in_threadpool(self._client.settle, reservation, cost, costs=costs)

    async def release(self, reservation: str) -> Settlement:
        return await run_in_threadpool(self._client.release, reservation)


def _settler(client: AnyClient) -> Union[AsyncSluiceClient, _ThreadedSettler]:
    return client if isinstance(client, AsyncSluiceClient) else _ThreadedSettler(client)


async def _call_cost(cost: Union[int, CostFunc, None], request: Request) -> Optional[int]:
    if cost is None or isinstance(cost, int):
        return cost
    value = cost(request)
    if inspect.isawaitable(value):
        value = await value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"cost function {getattr(cost, '__name__', cost)!r} returned "
            f"{type(value).__name__}; it must return an int"
        )
    return value


_default: Optional[Limiter] = None


def _limiter_for(client: Optional[AnyClient]) -> Limiter:
    global _default
    if client is not None:
        return Limiter(client)
    if _default is None:
        _default = Limiter()
    return _default


def limit(
    limit_name: str, key: KeyFunc, cost: int = 1, client: Optional[AnyClient] = None
) -> Dependency:
    """``Depends(limit("chat_user", key=user_key))``: see :meth:`Limiter.limit`.

    Without ``client``, one shared :class:`~sluice_client.AsyncSluiceClient` on
    ``$SLUICE_URL`` (default ``http://127.0.0.1:8080``, fail open) is used."""
    return _limiter_for(client).limit(limit_name, key, cost)


def limits(specs: Iterable[LimitSpec], client: Optional[AnyClient] = None) -> Dependency:
    """``Depends(limits([("chat_user", user_key), ("chat_ip", client_ip)]))``:
    see :meth:`Limiter.limits`."""
    return _limiter_for(client).limits(specs)


# -- keys ---------------------------------------------------------------------------


def safe_key(key: str) -> str:
    """Keys over sluice's 512 bytes become ``sha256:<hex>``, as sluice's own templates do."""
    if not isinstance(key, str):
        raise TypeError(f"a sluice key must be a str, not {type(key).__name__}")
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    return key


async def _call_key(key_func: KeyFunc, request: Request) -> Optional[str]:
    value = key_func(request)
    if inspect.isawaitable(value):
        value = await value
    if value is not None and not isinstance(value, str):
        raise TypeError(
            f"key function {getattr(key_func, '__name__', key_func)!r} returned "
            f"{type(value).__name__}; it must return a str or None"
        )
    return value


Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _parse_ip(text: str) -> Optional[Address]:
    text = text.strip().strip('"')
    if not text:
        return None
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _group(address: Address, ipv6_prefix: int) -> str:
    if isinstance(address, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


def client_ip(request: Request) -> Optional[str]:
    """The socket peer's address (``request.client.host``), IPv6 grouped by /64.

    Forwarding headers are ignored: use :class:`ClientIP` with
    ``trusted_proxies`` behind a proxy. ``None`` (skip) when the peer is unknown.
    """
    return _DIRECT(request)


class ClientIP:
    """A key function for the client's IP behind trusted proxies.

    The client is the socket peer unless that peer is in ``trusted_proxies``
    (addresses or CIDRs); then ``header`` (``x-forwarded-for`` or RFC 7239
    ``forwarded``) is walked from the right past trusted hops to the first address
    no trusted proxy vouches for. An entry that cannot be read stops the walk at the
    last trusted hop; at most 32 entries are read. IPv4-mapped IPv6 counts as IPv4
    and IPv6 clients are grouped by ``ipv6_prefix`` bits (64). This is sluice's own
    ``client_ip`` rule.
    """

    MAX_ENTRIES = 32

    def __init__(
        self,
        trusted_proxies: Iterable[str] = (),
        header: str = "x-forwarded-for",
        ipv6_prefix: int = 64,
    ) -> None:
        self.trusted = [ipaddress.ip_network(p.strip(), strict=False) for p in trusted_proxies]
        self.header = header.lower()
        if self.header not in ("x-forwarded-for", "forwarded"):
            raise ValueError("header must be 'x-forwarded-for' or 'forwarded'")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 0 and 128")
        self.ipv6_prefix = ipv6_prefix

    def _is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted)

    def _entries(self, request: Request) -> List[str]:
        values = request.headers.getlist(self.header)
        entries = [e for v in values for e in v.split(",")]
        if self.header == "forwarded":
            found = []
            for element in entries:
                value = ""
                for pair in element.split(";"):
                    name, _, v = pair.strip().partition("=")
                    if name.strip().lower() == "for":
                        value = v
                found.append(value)
            entries = found
        return entries[-self.MAX_ENTRIES :]

    def __call__(self, request: Request) -> Optional[str]:
        if request.client is None:
            return None
        peer = _parse_ip(request.client.host)
        if peer is None:
            return request.client.host or None
        hop = peer
        if self._is_trusted(peer):
            for entry in reversed(self._entries(request)):
                address = _parse_ip(entry)
                if address is None:
                    break
                hop = address
                if not self._is_trusted(address):
                    break
        return _group(hop, self.ipv6_prefix)


_DIRECT = ClientIP()


def _merge_headers(response: Response, headers: Dict[str, str]) -> None:
    for name, value in headers.items():
        existing = response.headers.get(name)
        response.headers[name] = f"{existing}, {value}" if existing else value


def _seconds(n: int) -> str:
    return f"{n} second{'' if n == 1 else 's'}"
