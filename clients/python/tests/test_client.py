"""The sync and async clients against a real sluice."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from typing import Callable

import httpx
import pytest
from conftest import SluiceServer, remaining

from sluice_client import (
    AsyncSluiceClient,
    Check,
    Decision,
    SluiceClient,
    SluiceRequestError,
    SluiceUnavailable,
)
from sluice_client._models import period_seconds, retry_after_seconds


def test_allows_then_denies_with_retry_after(sluice: SluiceServer, uid: str) -> None:
    with SluiceClient(sluice.url) as client:
        seen = [client.check_one("per_user", f"user:{uid}") for _ in range(4)]
    assert [d.allowed for d in seen] == [True, True, True, False]
    assert [d.results[0].remaining for d in seen[:3]] == [2, 1, 0]
    first = seen[0]
    assert first.retry_after_ms == 0 and not first.degraded and not first.unavailable
    assert first.results[0].limit == "per_user"
    assert first.results[0].key == f"user:{uid}"
    assert first.results[0].rate == "3/minute"
    assert first.results[0].limit_value == 3
    denied = seen[3]
    assert denied.retry_after_ms is not None and 0 < denied.retry_after_ms <= 20_000
    assert denied.retry_after_seconds == retry_after_seconds(denied.retry_after_ms)
    assert denied.denied_by is not None and denied.denied_by.limit == "per_user"


def test_several_checks_are_one_atomic_decision(sluice: SluiceServer, uid: str) -> None:
    client = SluiceClient(sluice.url)
    checks = [Check("two_rates", f"u:{uid}"), Check("per_ip", f"ip:{uid}")]
    first = client.check(checks)
    # two_rates has two windows: three results for two checks.
    assert [(r.limit, r.rate) for r in first.results] == [
        ("two_rates", "2/minute"),
        ("two_rates", "100/hour"),
        ("per_ip", "10/minute"),
    ]
    assert client.check(checks).allowed
    denied = client.check(checks)
    assert not denied.allowed
    assert denied.denied_by is not None and denied.denied_by.rate == "2/minute"
    # A denied decision charges nothing: per_ip was charged twice, not three times.
    assert remaining(sluice.url, "per_ip", f"ip:{uid}") == 8
    client.close()


def test_cost_dry_run_and_shadow(sluice: SluiceServer, uid: str) -> None:
    client = SluiceClient(sluice.url)
    key = f"ip:{uid}"
    dry = client.check([Check("per_ip", key)], cost=4, dry_run=True)
    assert dry.allowed and dry.results[0].remaining == 6
    assert remaining(sluice.url, "per_ip", key) == 10  # dry run charged nothing
    assert client.check([Check("per_ip", key)], cost=4).results[0].remaining == 6
    assert client.check([Check("per_ip", key, cost=2)], cost=4).results[0].remaining == 4
    assert client.check_one("per_ip", key, cost=0).results[0].remaining == 4
    # A cost that can never fit: denied, retry_after null, nothing charged.
    never = client.check_one("per_ip", key, cost=11)
    assert not never.allowed and never.retry_after_ms is None
    assert never.retry_after_seconds is None
    # Shadow limits report but never deny.
    client.check_one("shadowed", key)
    shadow = client.check_one("shadowed", key)
    assert shadow.allowed and shadow.results[0].shadow and not shadow.results[0].allowed
    assert shadow.denied_by is None
    client.close()


@pytest.mark.parametrize("on_error", ["allow", "deny", "raise"])
def test_bad_input_raises_request_error_whatever_on_error(
    sluice: SluiceServer, uid: str, on_error: str
) -> None:
    client = SluiceClient(sluice.url, on_error=on_error)  # type: ignore[arg-type]
    with pytest.raises(SluiceRequestError) as unknown:
        client.check_one("no_such_limit", uid)
    assert unknown.value.status == 400
    assert unknown.value.error == "unknown_limit"
    assert "per_user" in unknown.value.message  # sluice lists the configured limits
    with pytest.raises(SluiceRequestError) as cost:
        client.check_one("per_user", uid, cost=-1)
    assert cost.value.error == "invalid_cost"
    with pytest.raises(SluiceRequestError) as key:
        client.check_one("per_user", "")
    assert key.value.error == "invalid_key"
    with pytest.raises(SluiceRequestError) as empty:
        client.check([])
    assert empty.value.error == "invalid_request"
    client.close()


def test_wrong_base_url_path_is_a_request_error(sluice: SluiceServer) -> None:
    client = SluiceClient(sluice.url + "/not-sluice")
    with pytest.raises(SluiceRequestError) as info:
        client.check_one("per_user", "k")
    assert info.value.status == 404 and info.value.error == "not_found"


async def test_async_client(sluice: SluiceServer, uid: str) -> None:
    async with AsyncSluiceClient(sluice.url, timeout=2) as client:
        seen = [await client.check_one("per_user", f"user:{uid}") for _ in range(4)]
        assert [d.allowed for d in seen] == [True, True, True, False]
        assert seen[3].retry_after_seconds is not None and seen[3].retry_after_seconds >= 1
        both = await client.check(
            [Check("per_user", f"other:{uid}"), Check("per_ip", f"ip:{uid}", cost=3)]
        )
        assert both.allowed and [r.remaining for r in both.results] == [2, 7]
        dry = await client.check([Check("per_ip", f"ip:{uid}")], dry_run=True)
        assert dry.results[0].remaining == 6
        with pytest.raises(SluiceRequestError) as info:
            await client.check_one("no_such_limit", uid)
        assert info.value.error == "unknown_limit"


def _assert_fail_open(decision: Decision) -> None:
    assert decision.allowed and decision.degraded and decision.unavailable
    assert decision.retry_after_ms == 0 and decision.results == []


def _assert_fail_closed(decision: Decision) -> None:
    assert not decision.allowed and decision.degraded and decision.unavailable
    assert decision.retry_after_ms is None and decision.results == []


def test_unreachable_follows_on_error(
    closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "user:very-secret-id"
    caplog.set_level(logging.DEBUG, logger="sluice_client")
    _assert_fail_open(SluiceClient(closed_port_url, on_error="allow").check_one("per_user", secret))
    _assert_fail_closed(SluiceClient(closed_port_url, on_error="deny").check_one("per_user", secret))
    with pytest.raises(SluiceUnavailable) as info:
        SluiceClient(closed_port_url, on_error="raise").check_one("per_user", secret)
    assert "cannot reach" in info.value.reason
    warnings = [r for r in caplog.records if r.name == "sluice_client"]
    assert len(warnings) == 3 and all(r.levelno == logging.WARNING for r in warnings)
    assert all("per_user" in r.getMessage() for r in warnings)
    assert not any("very-secret-id" in r.getMessage() for r in caplog.records)


async def test_async_unreachable_follows_on_error(closed_port_url: str) -> None:
    async with AsyncSluiceClient(closed_port_url, on_error="allow") as client:
        _assert_fail_open(await client.check_one("per_user", "k"))
    async with AsyncSluiceClient(closed_port_url, on_error="deny") as client:
        _assert_fail_closed(await client.check_one("per_user", "k"))
    async with AsyncSluiceClient(closed_port_url, on_error="raise") as client:
        with pytest.raises(SluiceUnavailable):
            await client.check_one("per_user", "k")


def test_stopped_sluice_degrades(start_sluice: Callable[[], SluiceServer], uid: str) -> None:
    server = start_sluice()
    client = SluiceClient(server.url, on_error="allow")
    up = client.check_one("per_user", uid)
    assert up.allowed and not up.degraded
    server.stop()
    _assert_fail_open(client.check_one("per_user", uid))
    client.close()


def test_timeout_is_honoured(black_hole_url: str) -> None:
    client = SluiceClient(black_hole_url, timeout=0.3, on_error="deny")
    started = time.monotonic()
    decision = client.check_one("per_user", "k")
    elapsed = time.monotonic() - started
    _assert_fail_closed(decision)
    assert 0.25 <= elapsed < 2.0, elapsed
    with pytest.raises(SluiceUnavailable) as info:
        SluiceClient(black_hole_url, timeout=0.3, on_error="raise").check_one("per_user", "k")
    assert "timed out" in info.value.reason


async def test_async_timeout_is_honoured(black_hole_url: str) -> None:
    async with AsyncSluiceClient(black_hole_url, timeout=0.3, on_error="allow") as client:
        started = time.monotonic()
        decision = await client.check_one("per_user", "k")
        elapsed = time.monotonic() - started
    _assert_fail_open(decision)
    assert 0.25 <= elapsed < 2.0, elapsed


def test_5xx_and_garbage_are_unavailable() -> None:
    def store_down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": "store_unavailable", "message": "down"})

    def not_sluice(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>hello</html>")

    down = SluiceClient(on_error="raise", transport=httpx.MockTransport(store_down))
    with pytest.raises(SluiceUnavailable) as info:
        down.check_one("per_user", "k")
    assert info.value.status == 503 and "store_unavailable" in info.value.reason
    garbage = SluiceClient(on_error="allow", transport=httpx.MockTransport(not_sluice))
    _assert_fail_open(garbage.check_one("per_user", "k"))


def test_on_error_is_validated() -> None:
    with pytest.raises(ValueError):
        SluiceClient(on_error="open")  # type: ignore[arg-type]


def test_rate_periods() -> None:
    assert period_seconds("5/minute") == 60
    assert period_seconds("100/10s") == 10
    assert period_seconds("60/hour") == 3600
    assert period_seconds("50/day") == 86400
    assert period_seconds("50/2d") == 172800
    assert period_seconds("nonsense") is None
    assert retry_after_seconds(1) == 1
    assert retry_after_seconds(1000) == 1
    assert retry_after_seconds(1001) == 2
    assert retry_after_seconds(0) == 1
    assert retry_after_seconds(None) is None


def test_base_client_imports_without_fastapi() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['starlette'] = None\n"
        "import sluice_client\n"
        "from sluice_client import SluiceClient, AsyncSluiceClient, Check\n"
        "assert 'sluice_client.fastapi' not in sys.modules\n"
        "try:\n"
        "    import sluice_client.fastapi\n"
        "except ImportError as exc:\n"
        "    assert 'sluice-client[fastapi]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('sluice_client.fastapi imported without FastAPI')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
