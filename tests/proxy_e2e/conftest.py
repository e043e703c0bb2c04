"""Fixtures: the FastAPI apps under uvicorn (the quickstart's app, and a fake LLM API for
metered routes) and the real `sluice serve` in front of each."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import httpx
import pytest

from app import StreamControl, make_app
from llm_app import Ledger, make_llm_app

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sluice_binary() -> Path:
    configured = os.environ.get("SLUICE_BIN")
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = Path(configured) if configured else target / "debug" / "sluice"
    if not path.exists():
        if configured:
            pytest.fail(f"SLUICE_BIN={configured} does not exist")
        subprocess.run(["cargo", "build", "-p", "sluice"], cwd=REPO, check=True)
    return path


class AppServer:
    """A FastAPI app served by uvicorn in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Sluice:
    """`sluice serve` with a proxy config, on a free port."""

    def __init__(self, binary: Path, config: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="sluice-proxy-")
        path = Path(self._dir.name) / "sluice.yaml"
        path.write_text(f"listen: 127.0.0.1:{self.port}\n{config}")
        self.log_path = Path(self._dir.name) / "sluice.log"
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        self.process = subprocess.Popen(
            [str(binary), "serve", "--config", str(path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sluice exited at start:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"sluice did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        self._dir.cleanup()


# The config of the README's reverse-proxy quickstart. sluice trusts 127.0.0.1 as a
# proxy here, so each test can act as its own client address with X-Forwarded-For.
CONFIG = """
client_ip:
  trusted_proxies: [127.0.0.1]
limits:
  chat_user: {{rate: 5/minute}}
  chat_ip: {{rate: 30/minute}}
  search_session: {{rate: 3/minute}}
  search_ip: {{rate: 8/minute}}
routes:
  - match: {{path: /chat/message, methods: [POST]}}
    limits:
      - {{limit: chat_user, key: ["user:{{header.x-user-id}}", "ip:{{client_ip}}"]}}
      - {{limit: chat_ip, key: "{{client_ip}}"}}
  - match: {{path: /search}}
    limits:
      - {{limit: search_session, key: "{{session}}"}}
      - {{limit: search_ip, key: "{{client_ip}}"}}
proxy:
  upstream: {upstream}
  refund_on_status: [404]
  quota_path: /_sluice/quota
sessions:
  secret: 0123456789abcdef-test-secret
"""


@pytest.fixture(scope="session")
def sluice_bin() -> Path:
    return sluice_binary()


@pytest.fixture(scope="session")
def control() -> StreamControl:
    return StreamControl()


@pytest.fixture(scope="session")
def app(control: StreamControl) -> Iterator[AppServer]:
    server = AppServer(make_app(control))
    yield server
    server.stop()


@pytest.fixture
def start_sluice(sluice_bin: Path) -> Iterator[Callable[[str], Sluice]]:
    started: List[Sluice] = []

    def start(config: str) -> Sluice:
        server = Sluice(sluice_bin, config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="session")
def proxy(sluice_bin: Path, app: AppServer) -> Iterator[Sluice]:
    """The session's sluice in front of the app."""
    server = Sluice(sluice_bin, CONFIG.format(upstream=app.url))
    yield server
    server.close()


_next_ip = [10]


@pytest.fixture
def client_ip() -> str:
    """A client address of this test's own (sent as X-Forwarded-For via trusted 127.0.0.1)."""
    _next_ip[0] += 1
    return f"203.0.113.{_next_ip[0]}"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


# Metered LLM routes (README, "Metered LLM routes"): tokens and micro-dollars spent per
# user as the answers report them, and calls in flight. The budgets are large so that
# random usage never runs them out.
METERED_CONFIG = """
limits:
  tokens_day: {{rate: 100000000/day, algorithm: fixed_window}}
  dollars_day: {{rate: 1000000000/day, algorithm: fixed_window}}
  chat_in_flight: {{concurrency: 4}}
routes:
  - match: {{path: /v1/chat/completions, methods: [POST]}}
    usage: {{format: openai}}
    limits:
      - {{limit: tokens_day, key: "user:{{header.x-user-id}}", cost: usage}}
      - {{limit: dollars_day, key: "user:{{header.x-user-id}}", cost: usage, weights: {{input: 3, output: 15}}}}
      - {{limit: chat_in_flight, key: "user:{{header.x-user-id}}"}}
  - match: {{path: /v1/messages, methods: [POST]}}
    usage: {{format: anthropic}}
    limits:
      - {{limit: tokens_day, key: "user:{{header.x-user-id}}", cost: usage}}
      - {{limit: dollars_day, key: "user:{{header.x-user-id}}", cost: usage, weights: {{input: 3, output: 15}}}}
  - match: {{path: /v2/chat/completions, methods: [POST]}}
    usage: {{format: openai, default_output_tokens: 300}}
    limits:
      - {{limit: tokens_day, key: "user:{{header.x-user-id}}", cost: usage}}
      - {{limit: dollars_day, key: "user:{{header.x-user-id}}", cost: usage, weights: {{input: 3, output: 15}}}}
proxy:
  upstream: {upstream}
  quota_path: /_sluice/quota
"""


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture(scope="session")
def llm_app(ledger: Ledger) -> Iterator[AppServer]:
    server = AppServer(make_llm_app(ledger))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def metered_proxy(sluice_bin: Path, llm_app: AppServer) -> Iterator[Sluice]:
    """The session's sluice in front of the fake LLM API."""
    server = Sluice(sluice_bin, METERED_CONFIG.format(upstream=llm_app.url))
    yield server
    server.close()


_next_user = [0]


@pytest.fixture
def user() -> str:
    """A caller of this test's own, so its budgets start full."""
    _next_user[0] += 1
    return f"e2e-user-{_next_user[0]}-{os.getpid()}"
