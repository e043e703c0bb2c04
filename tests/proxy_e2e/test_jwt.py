"""Verified identity through the proxy: routes key users on `{jwt.sub}` of a bearer token
sluice verifies itself. A valid token is the user; every forgery falls back to the
anonymous key and never spends the claimed user's quota."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import socketserver
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SECRET = "a-test-hmac-secret-of-at-least-32-bytes"
ISSUER = "https://id.test"


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path_factory.mktemp("keys") / "rsa.pub"
    path.write_bytes(public_pem)
    return {"private": key, "public_pem": public_pem, "path": path}


def config(upstream: str, identity: str) -> str:
    return f"""
client_ip:
  trusted_proxies: [127.0.0.1]
jwt:
{identity}
limits:
  per_user: {{rate: 2/minute}}
routes:
  - match: {{path: /search}}
    limits:
      - {{limit: per_user, key: ["user:{{jwt.sub}}", "anon:{{client_ip}}"]}}
proxy:
  upstream: {upstream}
"""


def claims(sub: str, **extra: Any) -> Dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iss": ISSUER, "aud": "api", "exp": now + 300, "iat": now, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: Dict[str, Any], payload: Dict[str, Any], key: bytes) -> str:
    """A token signed with HMAC-SHA256 under any key bytes, as an attacker would."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


_ip = [100]


def fresh_ip() -> str:
    _ip[0] += 1
    return f"198.51.100.{_ip[0] % 250}"


def get(http: Any, sluice: Any, token: str | None, ip: str) -> int:
    headers = {"x-forwarded-for": ip}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return http.get(f"{sluice.url}/search", params={"q": "x"}, headers=headers).status_code


@pytest.fixture
def verified(start_sluice: Any, app: Any, rsa_key: Dict[str, Any]) -> Any:
    identity = f"""  algorithms: [HS256, RS256]
  secret: {SECRET}
  public_keys: ["{rsa_key['path']}"]
  issuer: {ISSUER}
  audience: api"""
    return start_sluice(config(app.url, identity))


def test_a_verified_user_is_limited_on_its_own_quota(verified: Any, http: Any, rsa_key: Dict[str, Any]) -> None:
    alice = jwt.encode(claims("alice"), SECRET, algorithm="HS256")
    # From three addresses: the token, not the address, is the key.
    assert [get(http, verified, alice, fresh_ip()) for _ in range(3)] == [200, 200, 429]
    bob = jwt.encode(claims("bob"), rsa_key["private"], algorithm="RS256")
    assert get(http, verified, bob, fresh_ip()) == 200, "RS256 verifies too, its own bucket"


def test_no_forgery_spends_the_claimed_users_quota(verified: Any, http: Any, rsa_key: Dict[str, Any]) -> None:
    victim = claims("victim")
    payload = b64(json.dumps(victim).encode())
    forgeries = {
        "wrong secret": jwt.encode(victim, "another-secret-of-at-least-32-bytes!!", algorithm="HS256"),
        "alg none": f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}.",
        "HS/RS confusion": hand_signed({"alg": "HS256", "typ": "JWT"}, victim, rsa_key["public_pem"]),
        "expired": jwt.encode(claims("victim", exp=int(time.time()) - 120), SECRET, algorithm="HS256"),
        "wrong audience": jwt.encode(claims("victim", aud="billing"), SECRET, algorithm="HS256"),
        "wrong issuer": jwt.encode(claims("victim", iss="https://evil.test"), SECRET, algorithm="HS256"),
        "unsigned RS256": jwt.encode(victim, SECRET, algorithm="HS256").rsplit(".", 1)[0] + ".",
    }
    for name, token in forgeries.items():
        for _ in range(2):
            status = get(http, verified, token, fresh_ip())
            assert status == 401, f"{name}: a JWT that does not verify is refused ({status})"
    genuine = jwt.encode(victim, SECRET, algorithm="HS256")
    assert [get(http, verified, genuine, fresh_ip()) for _ in range(3)] == [200, 200, 429], (
        "the victim's quota was untouched by 14 forged requests"
    )
    # An API key is no JWT: keyed by address, as a caller without a token.
    assert get(http, verified, "sk-live-0123456789", fresh_ip()) == 200


def test_a_user_cannot_leave_its_bucket_by_spelling_its_token_differently(
    verified: Any, http: Any
) -> None:
    """Spellings an application's JWT library accepts and sluice would not read (pyjwt
    takes a padded signature; Starlette reads the first of two headers): each is
    refused rather than counted as a stranger, so the user's quota holds."""
    alice = jwt.encode(claims("alice-2"), SECRET, algorithm="HS256")
    ip = fresh_ip()
    assert [get(http, verified, alice, ip) for _ in range(3)] == [200, 200, 429]
    spelled = {
        "padded": {"authorization": f"Bearer {alice}="},
        "tab": {"authorization": f"Bearer\t{alice}"},
    }
    for name, headers in spelled.items():
        status = http.get(
            f"{verified.url}/search", headers={"x-forwarded-for": fresh_ip(), **headers}
        ).status_code
        assert status in (401, 429), f"{name}: {status}, past alice's quota"
    twice = http.get(
        f"{verified.url}/search",
        headers=[
            ("x-forwarded-for", fresh_ip()),
            ("authorization", f"Bearer {alice}"),
            ("authorization", "Bearer x"),
        ],
    ).status_code
    assert twice == 401, f"two Authorization headers: {twice}"


class _Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        time.sleep(30)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slow_jwks() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()


@pytest.mark.parametrize("where", ["down", "slow"])
def test_a_jwks_endpoint_that_is_down_or_slow_vouches_for_no_one(
    where: str, start_sluice: Any, app: Any, http: Any, rsa_key: Dict[str, Any], slow_jwks: str
) -> None:
    url = "http://127.0.0.1:1/jwks.json" if where == "down" else slow_jwks
    identity = f"""  algorithms: [RS256]
  jwks_url: {url}
  jwks_timeout_ms: 300
  issuer: {ISSUER}"""
    sluice = start_sluice(config(app.url, identity))
    carol = jwt.encode(claims("carol"), rsa_key["private"], algorithm="RS256", headers={"kid": "k1"})
    started = time.monotonic()
    statuses = [get(http, sluice, carol, fresh_ip()) for _ in range(4)]
    assert statuses == [200] * 4, "never keyed as carol: each call is its own anonymous address"
    assert time.monotonic() - started < 3, "no request waits for the key server"


def test_a_template_reading_claims_needs_a_jwt_section(start_sluice: Any, app: Any, sluice_bin: Path, tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "sluice.yaml"
    path.write_text(
        "limits:\n  per_user: {rate: 2/minute}\nroutes:\n  - match: {path: /search}\n"
        "    limits:\n      - {limit: per_user, key: \"user:{jwt.sub}\"}\n"
        f"proxy:\n  upstream: {app.url}\n"
    )
    result = subprocess.run(
        [str(sluice_bin), "check-config", str(path)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "jwt:" in result.stderr and "never reads an unverified token" in result.stderr, result.stderr
