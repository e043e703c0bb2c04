"""Sync and async clients for sluice's ``POST /v1/check``."""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Type, Union

import httpx

from ._models import (
    Check,
    Decision,
    SluiceRequestError,
    SluiceUnavailable,
    checks_to_json,
)

__all__ = ["AsyncSluiceClient", "OnError", "SluiceClient"]

logger = logging.getLogger("sluice_client")

#: What a client does when sluice is unreachable, times out or answers 5xx.
OnError = Literal["allow", "deny", "raise"]
_ON_ERROR = ("allow", "deny", "raise")

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 0.5


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
        status = response.status_code
        if status == 200:
            try:
                return Decision.from_json(response.json())
            except (ValueError, KeyError, TypeError) as exc:
                raise SluiceUnavailable(
                    f"sluice answered 200 with a body that is not a decision: {exc}",
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
