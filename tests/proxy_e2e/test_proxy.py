"""sluice as a reverse proxy in front of a real FastAPI app: what a user of the app sees."""

from __future__ import annotations

import time
from typing import Callable, Dict, List

import httpx

from app import StreamControl
from conftest import AppServer, Sluice, free_port


def chat(http: httpx.Client, proxy: Sluice, ip: str, user: str = "") -> httpx.Response:
    headers = {"X-Forwarded-For": ip}
    if user:
        headers["X-User-Id"] = user
    return http.post(proxy.url + "/chat/message", headers=headers, content=b"hi")


def quota(client: httpx.Client, proxy: Sluice, ip: str, path: str = "/search") -> Dict[str, dict]:
    response = client.get(
        proxy.url + "/_sluice/quota",
        params={"path": path, "method": "GET"},
        headers={"X-Forwarded-For": ip},
    )
    assert response.status_code == 200, response.text
    return {entry["limit"]: entry for entry in response.json()["limits"]}


def test_the_sixth_chat_message_in_a_minute_is_refused_while_health_stays_up(
    http: httpx.Client, proxy: Sluice, control: StreamControl, client_ip: str
) -> None:
    control.release()
    for i in range(5):
        response = chat(http, proxy, client_ip, user="alice")
        assert response.status_code == 200, response.text
        assert "data: first" in response.text
        assert response.headers["x-ratelimit-remaining"] == str(4 - i)
        assert '"chat_user";q=5;w=60' in response.headers["ratelimit-policy"]
    denied = chat(http, proxy, client_ip, user="alice")
    assert denied.status_code == 429
    assert 1 <= int(denied.headers["retry-after"]) <= 12
    body = denied.json()
    assert body["error"] == "rate_limited"
    assert body["limit"] == "chat_user"
    assert body["retry_after_seconds"] == int(denied.headers["retry-after"])
    assert denied.headers["content-type"] == "application/json"
    for _ in range(3):
        health = http.get(proxy.url + "/health", headers={"X-Forwarded-For": client_ip})
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
    # Another user from the same address has a bucket of its own.
    assert chat(http, proxy, client_ip, user="bob").status_code == 200


def test_anonymous_callers_are_limited_by_ip(
    http: httpx.Client, proxy: Sluice, control: StreamControl, client_ip: str
) -> None:
    control.release()
    for _ in range(5):
        assert chat(http, proxy, client_ip).status_code == 200
    denied = chat(http, proxy, client_ip)
    assert denied.status_code == 429
    assert denied.json()["limit"] == "chat_user"
    other_ip = client_ip.rsplit(".", 1)[0] + ".250"
    assert chat(http, proxy, other_ip).status_code == 200, "another address is not affected"


def test_the_first_event_arrives_before_the_stream_ends(
    proxy: Sluice, control: StreamControl, client_ip: str
) -> None:
    control.released.clear()
    control.finished.clear()
    with httpx.Client(timeout=10) as client:
        started = time.monotonic()
        with client.stream(
            "POST",
            proxy.url + "/chat/message",
            headers={"X-Forwarded-For": client_ip, "X-User-Id": "streamer"},
            content=b"hello",
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            first = next(lines)
            first_at = time.monotonic() - started
            assert first == "data: first"
            assert not control.finished.is_set(), "the app is still streaming"
            control.release()
            rest: List[str] = [line for line in lines if line]
            ended_at = time.monotonic() - started
    # The app holds the stream for 2 s unless released: a buffering proxy would deliver
    # the first event only after that.
    assert first_at < 1.0, f"first event after {first_at:.2f} s"
    assert rest == ["data: token 0", "data: token 1", "data: token 2", "data: echo hello"]
    assert control.finished.is_set()
    assert ended_at >= first_at


def test_a_session_cookie_is_issued_and_counted_on(
    proxy: Sluice, client_ip: str
) -> None:
    with httpx.Client(timeout=10) as browser:
        first = browser.get(proxy.url + "/search", params={"q": "a"}, headers={"X-Forwarded-For": client_ip})
        assert first.status_code == 200
        cookie = first.headers["set-cookie"]
        assert cookie.startswith("sluice_session=")
        for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="]:
            assert attribute in cookie, cookie
        assert "Secure" not in cookie, "plain HTTP from the edge"
        remaining = [first.headers["x-ratelimit-remaining"]]
        for _ in range(2):
            again = browser.get(proxy.url + "/search", params={"q": "a"}, headers={"X-Forwarded-For": client_ip})
            assert again.status_code == 200
            assert "set-cookie" not in again.headers, "a valid cookie is kept"
            remaining.append(again.headers["x-ratelimit-remaining"])
        assert remaining == ["2", "1", "0"]
        denied = browser.get(proxy.url + "/search", params={"q": "a"}, headers={"X-Forwarded-For": client_ip})
        assert denied.status_code == 429
        assert denied.json()["limit"] == "search_session"
    # A new browser (a new session) on the same address has its own session bucket.
    with httpx.Client(timeout=10) as other:
        ok = other.get(proxy.url + "/search", params={"q": "b"}, headers={"X-Forwarded-For": client_ip})
        assert ok.status_code == 200, ok.text


def test_a_tampered_cookie_is_treated_as_absent(proxy: Sluice, client_ip: str) -> None:
    def search(cookie: str = "") -> httpx.Response:
        # No cookie jar: each request carries exactly the cookie given.
        headers = {"X-Forwarded-For": client_ip}
        if cookie:
            headers["Cookie"] = f"sluice_session={cookie}"
        return httpx.get(proxy.url + "/search", params={"q": "t"}, headers=headers, timeout=10)

    issued = search()
    value = issued.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    session_id, tag = value.split(".")
    for _ in range(2):
        assert search(value).status_code == 200
    assert search(value).status_code == 429, "the session's own quota is spent"
    flipped = ("1" if tag[0] == "0" else "0") + tag[1:]
    for forged in [f"{session_id}.{flipped}", f"{'0' * 32}.{tag}", session_id, "garbage"]:
        response = search(forged)
        assert response.status_code == 200, (forged, response.text)
        new_cookie = response.headers["set-cookie"]
        assert session_id not in new_cookie, "a fresh session, not the forged one"
        assert '"search_session";r=2;' in response.headers["ratelimit"], "counted on the fresh session"


def test_a_cookieless_client_is_still_caught_by_the_ip_layer(
    http: httpx.Client, proxy: Sluice, client_ip: str
) -> None:
    statuses = []
    for _ in range(10):
        # httpx.Client keeps cookies; sending none by hand is what a cookie-refusing client does.
        http.cookies.clear()
        response = http.get(proxy.url + "/search", params={"q": "c"}, headers={"X-Forwarded-For": client_ip})
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["limit"] == "search_ip"
    assert statuses == [200] * 8 + [429] * 2


def test_the_quota_endpoint_counts_down_and_does_not_consume(proxy: Sluice, client_ip: str) -> None:
    with httpx.Client(timeout=10) as browser:
        headers = {"X-Forwarded-For": client_ip}
        browser.get(proxy.url + "/search", params={"q": "q"}, headers=headers)
        before = quota(browser, proxy, client_ip)
        assert set(before) == {"search_session", "search_ip"}
        session = before["search_session"]
        assert session["remaining"] == 2
        assert session["quota"] == 3
        assert session["window_seconds"] == 60
        assert session["rate"] == "3/minute"
        assert session["cost"] == 1
        assert 1 <= session["reset_after_seconds"] <= 60
        assert session["reset_at"].endswith("Z") and "T" in session["reset_at"]
        for _ in range(5):
            assert quota(browser, proxy, client_ip)["search_session"]["remaining"] == 2, "reading is free"
        browser.get(proxy.url + "/search", params={"q": "q"}, headers=headers)
        after = quota(browser, proxy, client_ip)
        assert after["search_session"]["remaining"] == 1
        assert after["search_ip"]["remaining"] == before["search_ip"]["remaining"] - 1
        # A path no route covers has no limits.
        assert quota(browser, proxy, client_ip, path="/health") == {}


def test_the_quota_endpoint_explains_a_bad_query(http: httpx.Client, proxy: Sluice) -> None:
    for params, word in [
        ({}, "path"),
        ({"path": "search"}, "path"),
        ({"path": "/search", "method": "NOT A METHOD"}, "method"),
        ({"path": "/search", "limit": "x"}, "limit"),
    ]:
        response = http.get(proxy.url + "/_sluice/quota", params=params)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "invalid_query"
        assert word in body["message"]
    assert http.post(proxy.url + "/_sluice/quota?path=/search").status_code == 405


def test_a_404_from_the_upstream_is_refunded(proxy: Sluice, client_ip: str) -> None:
    with httpx.Client(timeout=10) as browser:
        headers = {"X-Forwarded-For": client_ip}
        for _ in range(6):
            missing = browser.get(proxy.url + "/search", params={"q": "missing"}, headers=headers)
            assert missing.status_code == 404, missing.text
            assert missing.json() == {"detail": "no such thing"}
        left = quota(browser, proxy, client_ip)
        assert left["search_session"]["remaining"] == 3, "every 404 was given back"
        assert left["search_ip"]["remaining"] == 8
        browser.get(proxy.url + "/search", params={"q": "found"}, headers=headers)
        assert quota(browser, proxy, client_ip)["search_session"]["remaining"] == 2, "a 200 is not"


def test_an_upstream_that_is_down_gives_a_json_502(
    start_sluice: Callable[[str], Sluice], http: httpx.Client
) -> None:
    from conftest import CONFIG

    down = start_sluice(CONFIG.format(upstream=f"http://127.0.0.1:{free_port()}"))
    response = http.get(down.url + "/health")
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "upstream_unavailable"
    assert "upstream" in body["message"]
    # sluice itself is up: it answered the 502 itself, as JSON.
    assert response.headers["content-type"] == "application/json"


def test_sluice_s_own_endpoints_are_not_served_to_the_proxied_clients(
    http: httpx.Client, proxy: Sluice, client_ip: str
) -> None:
    """Any client could otherwise POST /v1/check to lock another user out, or read
    anyone's quota: by default they belong to the app (FastAPI's own 404 here)."""
    for method, path in [
        ("POST", "/v1/check"),
        ("GET", "/metrics"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/limits"),
        ("GET", "/healthz"),
    ]:
        response = http.request(
            method,
            proxy.url + path,
            json={"checks": [{"limit": "chat_user", "key": "user:victim", "cost": 5}]},
        )
        assert response.status_code in (404, 405), (path, response.text)
        assert response.json() == {"detail": "Not Found"} or response.status_code == 405
    assert http.get(proxy.url + "/nothing-here").json() == {"detail": "Not Found"}, "FastAPI's own 404"
    # The victim's quota is whole.
    headers = {"X-Forwarded-For": client_ip, "X-User-Id": "victim"}
    assert http.post(proxy.url + "/chat/message", headers=headers, content=b"x").status_code == 200


def raw_request(proxy: Sluice, method: str, target: str, headers: Dict[str, str]) -> str:
    """Sends the request line byte for byte (httpx would resolve dot segments)."""
    import socket

    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{proxy.port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ["Content-Length: 2", "", "hi"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("latin-1")


def test_no_spelling_of_the_chat_path_reaches_the_handler_for_free(
    http: httpx.Client, proxy: Sluice, control: StreamControl, client_ip: str
) -> None:
    """uvicorn percent-decodes the path before FastAPI routes it: `/chat%2Fmessage`
    runs the `/chat/message` handler. Once the user's quota is spent, no spelling of
    the path may run it again."""
    control.release()
    for _ in range(5):
        assert chat(http, proxy, client_ip, user="mallory").status_code == 200
    headers = {"X-Forwarded-For": client_ip, "X-User-Id": "mallory"}
    for target in [
        "/chat%2Fmessage",
        "/chat%2fmessage",
        "/chat%5Cmessage",
        "/chat/message;x=1",
        "/chat/message%3B",
        "/chat/message%00",
        "/chat/x/../message",
        "/chat/./message",
        "/%63hat/%6Dessage",
        "/chat/message/",
        "//chat/message",
        "/CHAT/message",
    ]:
        answer = raw_request(proxy, "POST", target, headers)
        status = int(answer.split(" ", 2)[1])
        assert "data: first" not in answer, f"{target} ran the handler: {answer[:300]}"
        assert status in (400, 429, 404, 307), f"{target}: {answer[:300]}"
        if status == 400:
            assert '"error":"invalid_path"' in answer.replace(" ", ""), answer
