"""Real FastAPI apps under uvicorn, limited by a real sluice, called over HTTP."""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import httpx
import pytest
from conftest import AppServer, SluiceServer, remaining
from fastapi import Depends, FastAPI, HTTPException, Request, Response

from sluice_client import AsyncSluiceClient, Decision, SluiceClient
from sluice_client.fastapi import (
    ClientIP,
    Limiter,
    client_ip,
    install,
    limit,
    limits,
    rate_limit_headers,
)

Serve = Callable[[Any], AppServer]

# The app sits "behind" a proxy on 127.0.0.1, so tests choose their client IP with
# X-Forwarded-For and never share the per-IP bucket.
behind_proxy = ClientIP(trusted_proxies=["127.0.0.1"])


def user_key(request: Request) -> Optional[str]:
    user = request.headers.get("x-user-id")
    return f"user:{user}" if user else None


async def async_user_key(request: Request) -> Optional[str]:
    return user_key(request)


def summary(decision: Decision) -> Dict[str, Any]:
    return {
        "allowed": decision.allowed,
        "degraded": decision.degraded,
        "unavailable": decision.unavailable,
        "checked": sorted({r.limit for r in decision.results}),
    }


def make_app(client: Any, *, installed: bool = True) -> FastAPI:
    app = FastAPI()
    limiter = Limiter(client)
    if installed:
        limiter.install(app)

    @app.get("/chat")
    async def chat(decision: Decision = Depends(limiter.limit("per_user", key=user_key))) -> Any:
        return summary(decision)

    @app.get("/chat-async-key")
    async def chat_async(
        decision: Decision = Depends(limiter.limit("per_user", key=async_user_key)),
    ) -> Any:
        return summary(decision)

    @app.get("/expensive")
    async def expensive(
        decision: Decision = Depends(limiter.limit("per_user", key=user_key, cost=4)),
    ) -> Any:
        return summary(decision)

    @app.get("/multi")
    async def multi(
        decision: Decision = Depends(
            limiter.limits([("per_user", user_key), ("per_ip", behind_proxy)])
        ),
    ) -> Any:
        return summary(decision)

    # The staged pattern: the IP layer runs before anything else; the API key's own
    # layer only once the key is known to be real, so fake keys never create counters.
    @app.post("/api/data", dependencies=[Depends(limiter.limit("per_ip", key=behind_proxy))])
    async def data(request: Request, response: Response) -> Any:
        api_key = request.headers.get("x-api-key")
        if api_key is None or not api_key.startswith("key-good-"):  # "validation"
            raise HTTPException(401, "invalid API key")
        decision = await limiter.hit("api_key", api_key, response=response)
        return summary(decision)

    @app.get("/whoami")
    def whoami(request: Request) -> Any:
        return {"direct": client_ip(request), "behind_proxy": behind_proxy(request)}

    return app


def assert_denial(
    response: httpx.Response, limit: str, *, retry: bool = True, wrapped: bool = False
) -> Dict[str, Any]:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    body: Dict[str, Any] = response.json()
    if wrapped:
        body = body["detail"]
    assert set(body) == {"error", "message", "limit", "retry_after_seconds"}
    assert body["error"] == "rate_limited"
    assert body["limit"] == limit
    if retry:
        seconds = int(response.headers["retry-after"])
        assert 1 <= seconds <= 60
        assert body["retry_after_seconds"] == seconds
        assert f"Too many requests for {limit}; retry in {seconds} second" in body["message"]
    else:
        assert "retry-after" not in response.headers
        assert body["retry_after_seconds"] is None
        assert body["message"] == f"This request costs more than {limit} can ever allow."
    return body


@pytest.fixture(params=["async", "sync"])
def app(request: pytest.FixtureRequest, sluice: SluiceServer, serve: Serve) -> AppServer:
    """The app with an async client, and with a sync one (run in the thread pool)."""
    if request.param == "async":
        client: Any = AsyncSluiceClient(sluice.url, timeout=2)
    else:
        client = SluiceClient(sluice.url, timeout=2)
    return serve(make_app(client))


def test_allowed_then_429_with_retry_after_and_body(
    app: AppServer, http: httpx.Client, uid: str
) -> None:
    headers = {"x-user-id": uid}
    for left in (2, 1, 0):
        ok = http.get(app.url + "/chat", headers=headers)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {
            "allowed": True,
            "degraded": False,
            "unavailable": False,
            "checked": ["per_user"],
        }
        assert ok.headers["ratelimit-policy"] == '"per_user";q=3;w=60'
        assert ok.headers["ratelimit"].startswith(f'"per_user";r={left};t=')
    denied = http.get(app.url + "/chat", headers=headers)
    assert_denial(denied, "per_user")
    assert denied.headers["ratelimit"].startswith('"per_user";r=0;t=')


def test_buckets_are_per_key(app: AppServer, http: httpx.Client, uid: str) -> None:
    for _ in range(3):
        assert http.get(app.url + "/chat", headers={"x-user-id": f"a{uid}"}).status_code == 200
    assert http.get(app.url + "/chat", headers={"x-user-id": f"a{uid}"}).status_code == 429
    other = http.get(app.url + "/chat-async-key", headers={"x-user-id": f"b{uid}"})
    assert other.status_code == 200
    assert other.headers["ratelimit"].startswith('"per_user";r=2;')
    # The async key function reaches the same bucket as the sync one.
    assert http.get(app.url + "/chat-async-key", headers={"x-user-id": f"a{uid}"}).status_code == 429


def test_key_none_skips_the_check(app: AppServer, http: httpx.Client) -> None:
    for _ in range(5):
        response = http.get(app.url + "/chat")
        assert response.status_code == 200
        assert response.json()["checked"] == []
        assert "ratelimit" not in response.headers


def test_cost_that_never_fits_has_no_retry_after(
    app: AppServer, http: httpx.Client, uid: str
) -> None:
    assert_denial(http.get(app.url + "/expensive", headers={"x-user-id": uid}), "per_user", retry=False)
    # Nothing was charged.
    assert http.get(app.url + "/chat", headers={"x-user-id": uid}).headers["ratelimit"].startswith(
        '"per_user";r=2;'
    )


def test_several_limits_in_one_atomic_decision(
    app: AppServer, sluice: SluiceServer, http: httpx.Client, uid: str
) -> None:
    ip = f"198.51.100.{int(uid[:2], 16) % 250 + 1}"
    headers = {"x-user-id": uid, "x-forwarded-for": ip}
    for _ in range(3):
        ok = http.get(app.url + "/multi", headers=headers)
        assert ok.status_code == 200
        assert ok.json()["checked"] == ["per_ip", "per_user"]
    assert remaining(sluice.url, "per_ip", ip) is not None
    ip_left = remaining(sluice.url, "per_ip", ip)
    denied = http.get(app.url + "/multi", headers=headers)
    assert_denial(denied, "per_user")
    assert '"per_ip";' in denied.headers["ratelimit-policy"]
    # The denied decision charged nothing, per_ip included.
    assert remaining(sluice.url, "per_ip", ip) == ip_left


def test_staged_pattern_fake_keys_never_create_counters(
    sluice: SluiceServer, serve: Serve, http: httpx.Client, uid: str
) -> None:
    app = serve(make_app(AsyncSluiceClient(sluice.url, timeout=2)))
    ip = f"2001:db8:{uid[:4]}:{uid[4:8]}::1"
    ip_key = str(ipaddress.IPv6Network(f"{ip}/64", strict=False))  # grouped by /64
    fake = f"key-fake-{uid}"
    for _ in range(3):
        response = http.post(app.url + "/api/data", headers={"x-api-key": fake, "x-forwarded-for": ip})
        assert response.status_code == 401
        assert response.json() == {"detail": "invalid API key"}
    # The fake key has no counter (a cost-0 read finds it full)...
    assert remaining(sluice.url, "api_key", fake) == 2
    # ...while the IP layer counted every attempt.
    assert remaining(sluice.url, "per_ip", ip_key) == 7

    real = f"key-good-{uid}"
    good = {"x-api-key": real, "x-forwarded-for": ip}
    for left in (1, 0):
        ok = http.post(app.url + "/api/data", headers=good)
        assert ok.status_code == 200
        assert ok.json()["checked"] == ["api_key"]
        # Both layers' headers reach the response, the IP layer's first.
        assert ok.headers["ratelimit-policy"] == '"per_ip";q=10;w=60, "api_key";q=2;w=60'
        assert f', "api_key";r={left};t=' in ok.headers["ratelimit"]
    assert_denial(http.post(app.url + "/api/data", headers=good), "api_key")
    assert remaining(sluice.url, "api_key", real) == 0
    assert remaining(sluice.url, "per_ip", ip_key) == 4


def test_client_ip_ignores_forwarding_headers_unless_trusted(
    app: AppServer, http: httpx.Client
) -> None:
    seen = http.get(app.url + "/whoami", headers={"x-forwarded-for": "203.0.113.9"}).json()
    assert seen == {"direct": "127.0.0.1", "behind_proxy": "203.0.113.9"}


def _request(peer: str, headers: List[Tuple[str, str]]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    return Request({"type": "http", "client": (peer, 5000), "headers": raw})


def test_client_ip_rules() -> None:
    proxies = ClientIP(trusted_proxies=["10.0.0.0/8", "127.0.0.1"])
    xff = "x-forwarded-for"
    # Untrusted peer: the header is ignored.
    assert proxies(_request("192.0.2.1", [(xff, "203.0.113.9")])) == "192.0.2.1"
    assert client_ip(_request("10.0.0.1", [(xff, "203.0.113.9")])) == "10.0.0.1"
    # Walk from the right past trusted hops to the first untrusted address.
    assert proxies(_request("10.0.0.1", [(xff, "1.1.1.1, 203.0.113.9, 10.2.3.4")])) == "203.0.113.9"
    # Several header lines count as one list.
    assert proxies(_request("10.0.0.1", [(xff, "203.0.113.9"), (xff, "10.2.3.4")])) == "203.0.113.9"
    # Garbage stops the walk at the last trusted hop.
    assert proxies(_request("10.0.0.1", [(xff, "203.0.113.9, garbage, 10.2.3.4")])) == "10.2.3.4"
    assert proxies(_request("10.0.0.1", [(xff, "unknown")])) == "10.0.0.1"
    # All trusted: the leftmost.
    assert proxies(_request("10.0.0.1", [(xff, "10.9.9.9, 10.2.3.4")])) == "10.9.9.9"
    # Ports, IPv4-mapped IPv6, IPv6 /64 grouping.
    assert proxies(_request("10.0.0.1", [(xff, "203.0.113.9:4711")])) == "203.0.113.9"
    assert client_ip(_request("::ffff:203.0.113.9", [])) == "203.0.113.9"
    assert client_ip(_request("2001:db8:1:2:3:4:5:6", [])) == "2001:db8:1:2::/64"
    assert ClientIP(ipv6_prefix=128)(_request("2001:db8::6", [])) == "2001:db8::6"
    # RFC 7239 Forwarded.
    fwd = ClientIP(trusted_proxies=["10.0.0.0/8"], header="forwarded")
    header = 'for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711", for=10.1.1.1'
    assert fwd(_request("10.0.0.1", [("forwarded", header)])) == "2001:db8:cafe::/64"
    # No peer: skip.
    assert client_ip(Request({"type": "http", "headers": []})) is None
    # Only the last 32 entries are read.
    long = ", ".join(["203.0.113.1"] + ["10.0.0.2"] * 40)
    assert proxies(_request("10.0.0.1", [(xff, long)])) == "10.0.0.2"


def _dead_app(url: str, on_error: str, serve: Serve, timeout: float = 0.5) -> AppServer:
    return serve(make_app(AsyncSluiceClient(url, timeout=timeout, on_error=on_error)))  # type: ignore[arg-type]


def test_sluice_down_fail_open(closed_port_url: str, serve: Serve, http: httpx.Client) -> None:
    app = _dead_app(closed_port_url, "allow", serve)
    for _ in range(5):
        response = http.get(app.url + "/chat", headers={"x-user-id": "u"})
        assert response.status_code == 200
        assert response.json() == {
            "allowed": True,
            "degraded": True,
            "unavailable": True,
            "checked": [],
        }


def test_sluice_down_fail_closed(closed_port_url: str, serve: Serve, http: httpx.Client) -> None:
    app = _dead_app(closed_port_url, "deny", serve)
    response = http.get(app.url + "/chat", headers={"x-user-id": "u"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == {
        "error": "rate_limiter_unavailable",
        "message": "Rate limiting is unavailable; retry in 5 seconds.",
        "limit": "per_user",
        "retry_after_seconds": 5,
    }
    # A request with nothing to check never needed sluice.
    assert http.get(app.url + "/chat").status_code == 200


def test_sluice_down_raise_is_a_server_error(
    closed_port_url: str, serve: Serve, http: httpx.Client
) -> None:
    app = _dead_app(closed_port_url, "raise", serve)
    assert http.get(app.url + "/chat", headers={"x-user-id": "u"}).status_code == 500


def test_sluice_stopped_mid_flight(
    start_sluice: Callable[[], SluiceServer], serve: Serve, http: httpx.Client, uid: str
) -> None:
    server = start_sluice()
    app = _dead_app(server.url, "allow", serve)
    assert http.get(app.url + "/chat", headers={"x-user-id": uid}).json()["degraded"] is False
    server.stop()
    after = http.get(app.url + "/chat", headers={"x-user-id": uid})
    assert after.status_code == 200 and after.json()["degraded"] is True


def test_timeout_is_honoured_through_the_app(
    black_hole_url: str, serve: Serve, http: httpx.Client
) -> None:
    app = _dead_app(black_hole_url, "allow", serve, timeout=0.3)
    started = time.monotonic()
    response = http.get(app.url + "/chat", headers={"x-user-id": "u"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json()["degraded"] is True
    assert elapsed < 3.0, elapsed


def test_module_level_dependencies_and_uninstalled_fallback(
    sluice: SluiceServer, serve: Serve, http: httpx.Client, uid: str
) -> None:
    client = AsyncSluiceClient(sluice.url, timeout=2)
    app = FastAPI()  # no install(): FastAPI's own HTTPException answer

    @app.get("/one", dependencies=[Depends(limit("api_key", key=user_key, client=client))])
    async def one() -> Any:
        return {"ok": True}

    @app.get("/two")
    async def two(
        d: Decision = Depends(limits([("api_key", user_key), ("per_ip", client_ip, 0)], client=client)),
    ) -> Any:
        return summary(d)

    server = serve(app)
    headers = {"x-user-id": uid}
    assert http.get(server.url + "/one", headers=headers).status_code == 200
    assert http.get(server.url + "/two", headers=headers).json()["checked"] == ["api_key", "per_ip"]
    denied = http.get(server.url + "/one", headers=headers)
    assert_denial(denied, "api_key", wrapped=True)

    installed = FastAPI()
    install(installed)
    # An AsyncSluiceClient belongs to one event loop: this app runs in another.
    other_client = AsyncSluiceClient(sluice.url, timeout=2)

    @installed.get("/one", dependencies=[Depends(limit("api_key", key=user_key, client=other_client))])
    async def one_installed() -> Any:
        return {"ok": True}

    assert_denial(http.get(serve(installed).url + "/one", headers=headers), "api_key")


def test_long_keys_are_hashed_not_rejected(app: AppServer, http: httpx.Client, uid: str) -> None:
    long_user = "x" * 600 + uid
    for _ in range(3):
        assert http.get(app.url + "/chat", headers={"x-user-id": long_user}).status_code == 200


def test_rate_limit_headers_name_windows_of_multi_rate_limits() -> None:
    decision = Decision.from_json(
        {
            "allowed": True,
            "retry_after_ms": 0,
            "degraded": False,
            "results": [
                {"limit": "chat_user", "key": "u", "rate": "5/minute", "allowed": True,
                 "limit_value": 5, "remaining": 4, "reset_after_ms": 12000,
                 "retry_after_ms": 0, "shadow": False},
                {"limit": "chat_user", "key": "u", "rate": "60/hour", "allowed": True,
                 "limit_value": 60, "remaining": 59, "reset_after_ms": 60000,
                 "retry_after_ms": 0, "shadow": False},
                {"limit": "chat_ip", "key": "ip", "rate": "30/minute", "allowed": True,
                 "limit_value": 30, "remaining": 29, "reset_after_ms": 1001,
                 "retry_after_ms": 0, "shadow": False},
            ],
        }
    )
    assert rate_limit_headers(decision) == {
        "RateLimit-Policy": '"chat_user-60s";q=5;w=60, "chat_user-3600s";q=60;w=3600, "chat_ip";q=30;w=60',
        "RateLimit": '"chat_user-60s";r=4;t=12, "chat_user-3600s";r=59;t=60, "chat_ip";r=29;t=2',
    }
