"""Reservations (reserve, then settle what the call cost) against a real sluice.

`tokens` is `1000/day` (gcra: one token back every 86.4 s, so counts stay exact for
the length of a test) and `in_flight` is `concurrency: 2` (conftest.CONFIG).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any, Callable, List, Union

import httpx
import pytest
from conftest import AppServer, SluiceServer, remaining
from fastapi import Depends, FastAPI, HTTPException, Request, Response

from sluice_client import (
    AsyncReservation,
    AsyncSluiceClient,
    Check,
    ReservationDenied,
    ReservationNotFound,
    SluiceClient,
    SluiceRequestError,
    SluiceUnavailable,
)
from sluice_client.fastapi import Limiter

Serve = Callable[[Any], AppServer]


def tokens_left(sluice: SluiceServer, key: str) -> int:
    left = remaining(sluice.url, "tokens", key)
    assert left is not None
    return left


def test_settle_less_refunds_and_settling_again_changes_nothing(
    sluice: SluiceServer, uid: str
) -> None:
    key = f"user:{uid}"
    with SluiceClient(sluice.url, timeout=5) as client:
        r = client.reserve([Check("tokens", key)], cost=600, ttl=30)
        assert r.allowed and r.held and not r.degraded and not r.unavailable
        assert r.retry_after_ms == 0 and r.retry_after_seconds == 0
        assert r.results[0].limit == "tokens" and r.results[0].remaining == 400
        assert r.estimates == [600]
        assert r.token is not None and r.token not in repr(r)  # the token is a capability
        assert r.expires_at_ms is not None
        assert r.expires_at_ms >= time.time() * 1000 + 25_000
        assert r.expires_at == datetime.datetime.fromtimestamp(
            r.expires_at_ms / 1000, tz=datetime.timezone.utc
        )
        assert tokens_left(sluice, key) == 400, "the estimate is charged"

        first = r.settle(250)
        assert first.settled and not first.already_settled and not first.unavailable
        assert first.costs == [250] and len(first.reservation_id) == 32
        assert r.finished and r.settlement == first
        assert tokens_left(sluice, key) == 750, "only the actual stays"

        again = r.settle(250)
        assert again.settled and again.already_settled
        assert again.reservation_id == first.reservation_id
        # The token settles from anywhere (another process), idempotently too, and
        # the answer shows no cost it did not apply.
        elsewhere = client.settle(r.token, 999)
        assert elsewhere.already_settled and elsewhere.costs == []
        assert r.release().already_settled, "a release after a settle changes nothing"
        assert tokens_left(sluice, key) == 750


async def test_settle_more_puts_the_key_in_debt(sluice: SluiceServer, uid: str) -> None:
    key = f"user:{uid}"
    async with AsyncSluiceClient(sluice.url, timeout=5) as client:
        r = await client.reserve_one("tokens", key, cost=500)
        assert r.allowed
        settled = await r.settle(1900)
        assert settled.settled and settled.costs == [1900]

        with pytest.raises(ReservationDenied) as info:
            async with client.reserve_one("tokens", key, cost=1):
                pytest.fail("a reservation in debt must not run")
        # gcra 1000/day: 1900 spent of a 1000 bucket; one more token fits after 901
        # have drained, one every 86.4 s.
        denied = info.value
        assert denied.retry_after_ms is not None
        assert 901 * 86_400 - 1_000 <= denied.retry_after_ms <= 901 * 86_400, denied.retry_after_ms
        assert denied.retry_after_seconds == 77_847
        assert denied.limit == "tokens" and not denied.unavailable
        assert not denied.reservation.allowed and denied.reservation.token is None
        assert "tokens" in str(denied) and "retry in 77847 s" in str(denied)
        # Denied reservations hold nothing: nothing to settle or release.
        with pytest.raises(ReservationDenied):
            await denied.reservation.settle(1)
        with pytest.raises(ReservationDenied):
            await denied.reservation.release()


def test_release_and_per_check_costs(sluice: SluiceServer, uid: str) -> None:
    key = f"user:{uid}"
    client = SluiceClient(sluice.url, timeout=5)
    r = client.reserve([Check("tokens", key)], cost=800)
    released = r.release()
    assert released.settled and released.costs == [0]
    assert tokens_left(sluice, key) == 1000

    # One actual cost per check, in reserve order; the concurrency slot comes back.
    r = client.reserve([Check("per_ip", key, cost=1), Check("tokens", key, cost=300)])
    assert r.estimates == [1, 300]
    assert r.settle(costs=[1, 120]).costs == [1, 120]
    assert remaining(sluice.url, "per_ip", key) == 9
    assert tokens_left(sluice, key) == 880
    client.close()


def test_bad_settlements_and_reservations_are_refused(sluice: SluiceServer, uid: str) -> None:
    key = f"user:{uid}"
    client = SluiceClient(sluice.url, timeout=5, on_error="allow")
    r = client.reserve([Check("tokens", key), Check("in_flight", key)], cost=100)
    with pytest.raises(ValueError):
        r.settle()  # neither
    with pytest.raises(ValueError):
        r.settle(1, costs=[1, 1])  # both
    with pytest.raises(ValueError):
        r.settle(costs=[1])  # one check short
    assert not r.finished, "a refused call leaves the reservation open"
    with pytest.raises(SluiceRequestError) as negative:
        r.settle(-1)
    assert negative.value.error == "invalid_cost"
    with pytest.raises(TypeError):
        client.settle(r, 1)  # type: ignore[arg-type]
    with pytest.raises(SluiceRequestError) as garbage:
        client.settle("nonsense", 1)
    assert garbage.value.status == 400 and garbage.value.error == "invalid_reservation"
    with pytest.raises(SluiceRequestError) as ttl:
        client.reserve_one("tokens", key, ttl=0)
    assert ttl.value.error == "invalid_ttl"
    with pytest.raises(SluiceRequestError) as ttl:
        client.reserve_one("tokens", key, ttl=datetime.timedelta(days=2))
    assert ttl.value.error == "invalid_ttl"
    # A concurrency limit cannot be checked, only reserved.
    with pytest.raises(SluiceRequestError) as check:
        client.check_one("in_flight", key)
    assert check.value.error == "concurrency_needs_reserve"
    assert r.release().settled
    assert tokens_left(sluice, key) == 1000, "nothing else moved"
    client.close()


def test_sync_with_releases_on_exception_and_settles_at_estimate_otherwise(
    sluice: SluiceServer, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"user:{uid}"
    client = SluiceClient(sluice.url, timeout=5)
    with pytest.raises(RuntimeError, match="the model is down"):
        with client.reserve([Check("tokens", key), Check("in_flight", key)], cost=400) as r:
            assert tokens_left(sluice, key) == 600
            raise RuntimeError("the model is down")
    assert r.settlement is not None and r.settlement.costs == [0, 0]
    assert tokens_left(sluice, key) == 1000, "the call failed: the estimate came back"

    caplog.set_level(logging.WARNING, logger="sluice_client")
    with client.reserve([Check("tokens", key)], cost=300) as r:
        pass  # forgot to settle
    assert r.settlement is not None and r.settlement.costs == [300]
    assert tokens_left(sluice, key) == 700
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "sluice_client"]
    assert len(warnings) == 1 and "settling it at its estimate [300]" in warnings[0]
    assert key not in warnings[0] and r.token not in warnings[0]

    # Settled inside the block: leaving it changes nothing, even with an exception.
    with pytest.raises(KeyError):
        with client.reserve([Check("tokens", key)], cost=100) as r:
            r.settle(40)
            raise KeyError("after the call")
    assert tokens_left(sluice, key) == 660
    client.close()


async def test_async_with_releases_on_exception(sluice: SluiceServer, uid: str) -> None:
    key = f"user:{uid}"
    async with AsyncSluiceClient(sluice.url, timeout=5) as client:
        with pytest.raises(ValueError, match="bad answer"):
            async with client.reserve([Check("tokens", key)], cost=700) as r:
                assert isinstance(r, AsyncReservation)
                assert tokens_left(sluice, key) == 300
                raise ValueError("bad answer")
        assert tokens_left(sluice, key) == 1000
        assert r.settlement is not None and r.settlement.settled

        # Awaited, then entered: the same reservation.
        held = await client.reserve([Check("tokens", key)], cost=50)
        async with held as same:
            assert same is held
            await same.settle(10)
        assert tokens_left(sluice, key) == 990


async def test_concurrency_limit_denies_the_third_call_in_flight(
    sluice: SluiceServer, uid: str
) -> None:
    key = f"user:{uid}"
    ran: List[int] = []
    release_gate = asyncio.Event()

    async with AsyncSluiceClient(sluice.url, timeout=5) as client:

        async def call(i: int) -> Union[str, ReservationDenied]:
            try:
                async with client.reserve_one("in_flight", key) as r:
                    ran.append(i)
                    await release_gate.wait()
                    await r.settle(1)
                return "ran"
            except ReservationDenied as denied:
                return denied

        tasks = [asyncio.create_task(call(i)) for i in range(3)]
        deadline = time.monotonic() + 10
        while len(ran) + sum(t.done() for t in tasks) < 3:
            assert time.monotonic() < deadline, "the three calls did not get an answer"
            await asyncio.sleep(0.01)
        assert len(ran) == 2
        release_gate.set()
        outcomes = await asyncio.gather(*tasks)

        assert outcomes.count("ran") == 2
        denied = [o for o in outcomes if isinstance(o, ReservationDenied)]
        assert len(denied) == 1
        # The wait is until a held slot's reservation would expire (ttl 60 s).
        assert denied[0].retry_after_ms is not None and 0 < denied[0].retry_after_ms <= 60_000
        assert denied[0].limit == "in_flight"

        # Both slots came back with the settlements.
        again = [await client.reserve_one("in_flight", key) for _ in range(2)]
        assert all(r.allowed for r in again)
        for r in again:
            await r.release()


async def test_an_expired_reservation_cannot_be_settled(
    sluice: SluiceServer, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = f"user:{uid}"
    async with AsyncSluiceClient(sluice.url, timeout=5, on_error="allow") as client:
        r = await client.reserve([Check("tokens", key), Check("in_flight", key)], 100, ttl=0.2)
        assert r.expires_at_ms is not None
        await asyncio.sleep(0.5)
        with pytest.raises(ReservationNotFound) as info:
            await r.settle(0)
        assert info.value.status == 404 and info.value.error == "unknown_reservation"
        assert "expired" in info.value.message and "ttl" in info.value.message
        assert isinstance(info.value, SluiceRequestError)
        assert tokens_left(sluice, key) == 900, "it counted at its estimate"

        # A block that outlives its reservation and leaves without settling: the
        # settlement at the estimate is what sluice already did, so no error.
        caplog.set_level(logging.WARNING, logger="sluice_client")
        async with client.reserve([Check("tokens", key)], 100, ttl=0.2):
            await asyncio.sleep(0.5)
        assert any("could not be settled" in m for m in caplog.messages)
        assert tokens_left(sluice, key) == 800
        # The expired reservations' slots came back.
        both = [await client.reserve_one("in_flight", key) for _ in range(2)]
        assert all(r.allowed for r in both)
        for r in both:
            await r.release()


def test_sluice_down_follows_on_error(
    closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "user:very-secret-id"
    caplog.set_level(logging.DEBUG, logger="sluice_client")

    fail_open = SluiceClient(closed_port_url, on_error="allow")
    with fail_open.reserve([Check("tokens", secret)], cost=500) as r:
        assert r.allowed and r.degraded and r.unavailable and not r.held
        assert r.token is None and r.expires_at is None and r.results == []
        settled = r.settle(123)
    assert not settled.settled and settled.unavailable and settled.costs == []
    assert fail_open.reserve_one("tokens", secret).release().unavailable
    with fail_open.reserve_one("tokens", secret):
        pass  # leaving unsettled: nothing held, nothing to do, no error

    fail_closed = SluiceClient(closed_port_url, on_error="deny")
    with pytest.raises(ReservationDenied) as info:
        with fail_closed.reserve_one("tokens", secret):
            pytest.fail("fail closed must not run the call")
    assert info.value.unavailable and info.value.retry_after_ms is None
    assert info.value.retry_after_seconds is None
    assert "unavailable" in str(info.value)

    with pytest.raises(SluiceUnavailable):
        SluiceClient(closed_port_url, on_error="raise").reserve_one("tokens", secret)

    messages = [rec.getMessage() for rec in caplog.records if rec.name == "sluice_client"]
    assert any("settle skipped" in m for m in messages)
    assert any("release skipped" in m for m in messages)
    assert not any("very-secret-id" in m for m in caplog.messages)


async def test_async_sluice_down_fail_open(closed_port_url: str) -> None:
    async with AsyncSluiceClient(closed_port_url, on_error="allow") as client:
        async with client.reserve_one("tokens", "k", cost=10) as r:
            assert r.allowed and r.unavailable and r.token is None
            assert (await r.settle(3)).unavailable


def test_sluice_stopping_between_reserve_and_settle(
    start_sluice: Callable[[], SluiceServer], uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_sluice()
    allow = SluiceClient(server.url, timeout=1, on_error="allow")
    raise_ = SluiceClient(server.url, timeout=1, on_error="raise")
    a = allow.reserve_one("tokens", uid, cost=10)
    b = raise_.reserve_one("tokens", uid, cost=10)
    c = raise_.reserve_one("tokens", uid, cost=10)
    d = raise_.reserve_one("tokens", uid, cost=10)
    assert a.held and b.held and c.held and d.held
    server.stop()

    caplog.set_level(logging.WARNING, logger="sluice_client")
    settled = a.settle(5)
    assert not settled.settled and settled.unavailable
    assert any("was not settled" in m for m in caplog.messages)
    with pytest.raises(SluiceUnavailable):
        b.settle(5)
    # The block's own exception is what the caller sees, not the failed release.
    with pytest.raises(ZeroDivisionError):
        with c:
            1 / 0
    assert any("could not be released" in m for m in caplog.messages)
    # Leaving normally with on_error="raise": the failed settlement is an error.
    with pytest.raises(SluiceUnavailable):
        with d:
            pass


# -- FastAPI ---------------------------------------------------------------------------


def user_key(request: Request) -> str:
    return f"user:{request.headers['x-user-id']}"


async def estimate(request: Request) -> int:
    return int((await request.json())["estimate"])


def make_app(client: Any) -> FastAPI:
    app = FastAPI()
    limiter = Limiter(client)
    limiter.install(app)

    @app.post("/call")
    async def call(request: Request, response: Response) -> Any:
        body = await request.json()
        checks = [Check("tokens", user_key(request))]
        async with limiter.reserve(checks, body["estimate"], response=response) as r:
            if body.get("fail"):
                raise HTTPException(502, "the model failed")
            await r.settle(body["actual"])
        return {"settled": r.settlement is not None and r.settlement.settled}

    @app.post("/dep")
    async def dep(
        request: Request,
        r: AsyncReservation = Depends(limiter.reservation([("tokens", user_key)], cost=estimate)),
    ) -> Any:
        body = await request.json()
        if body.get("fail"):
            raise HTTPException(502, "the model failed")
        if "actual" in body:
            await r.settle(body["actual"])
        return {"estimates": r.estimates}

    return app


@pytest.fixture(params=["async", "sync"])
def app(request: pytest.FixtureRequest, sluice: SluiceServer, serve: Serve) -> AppServer:
    client: Any
    if request.param == "async":
        client = AsyncSluiceClient(sluice.url, timeout=5)
    else:
        client = SluiceClient(sluice.url, timeout=5)
    return serve(make_app(client))


def test_fastapi_reserve_in_the_endpoint(
    app: AppServer, sluice: SluiceServer, http: httpx.Client, uid: str
) -> None:
    headers = {"x-user-id": uid}
    ok = http.post(app.url + "/call", headers=headers, json={"estimate": 300, "actual": 120})
    assert ok.status_code == 200 and ok.json() == {"settled": True}
    assert ok.headers["ratelimit-policy"] == '"tokens";q=1000;w=86400'
    assert tokens_left(sluice, f"user:{uid}") == 880

    failed = http.post(app.url + "/call", headers=headers, json={"estimate": 300, "fail": True})
    assert failed.status_code == 502
    assert tokens_left(sluice, f"user:{uid}") == 880, "the failed call was released"

    denied = http.post(app.url + "/call", headers=headers, json={"estimate": 881, "actual": 1})
    assert denied.status_code == 429
    assert int(denied.headers["retry-after"]) >= 1
    assert denied.json()["error"] == "rate_limited" and denied.json()["limit"] == "tokens"


def test_fastapi_reservation_dependency(
    app: AppServer, sluice: SluiceServer, http: httpx.Client, uid: str
) -> None:
    headers = {"x-user-id": uid}
    key = f"user:{uid}"
    ok = http.post(app.url + "/dep", headers=headers, json={"estimate": 200, "actual": 50})
    assert ok.status_code == 200 and ok.json() == {"estimates": [200]}
    assert tokens_left(sluice, key) == 950
    # The endpoint raised: the dependency released the reservation.
    failed = http.post(app.url + "/dep", headers=headers, json={"estimate": 200, "fail": True})
    assert failed.status_code == 502
    assert tokens_left(sluice, key) == 950
    # The endpoint returned without settling: settled at the estimate.
    assert http.post(app.url + "/dep", headers=headers, json={"estimate": 200}).status_code == 200
    assert tokens_left(sluice, key) == 750
    denied = http.post(app.url + "/dep", headers=headers, json={"estimate": 751})
    assert denied.status_code == 429 and denied.json()["limit"] == "tokens"
