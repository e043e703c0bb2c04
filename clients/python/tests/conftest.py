"""Fixtures: a real `sluice serve` on a free port, real FastAPI apps under uvicorn."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]

# Limits the tests use. Keys are unique per test (see `uid`), so tests sharing the
# session's sluice never see each other's counters.
CONFIG = """
listen: 127.0.0.1:{port}
storage:
  backend: memory
  max_keys: 100000
limits:
  per_user: {{rate: 3/minute}}
  per_ip: {{rate: 10/minute}}
  api_key: {{rate: 2/minute}}
  two_rates: {{rate: [2/minute, 100/hour]}}
  shadowed: {{rate: 1/minute, shadow: true}}
  tokens: {{rate: 1000/day}}
  in_flight: {{concurrency: 2}}
"""


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


class SluiceServer:
    """One `sluice serve` process on a free loopback port."""

    def __init__(self, binary: Path, config: str = CONFIG) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="sluice-py-")
        self.config_path = Path(self._dir.name) / "sluice.yaml"
        self.config_path.write_text(config.format(port=self.port))
        self.log_path = Path(self._dir.name) / "sluice.log"
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        self.process = subprocess.Popen(
            [str(binary), "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sluice exited at start:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sluice did not become healthy:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


@pytest.fixture(scope="session")
def sluice_bin() -> Path:
    return sluice_binary()


@pytest.fixture(scope="session")
def sluice(sluice_bin: Path) -> Iterator[SluiceServer]:
    """The session's shared sluice."""
    server = SluiceServer(sluice_bin)
    yield server
    server.close()


@pytest.fixture
def start_sluice(sluice_bin: Path) -> Iterator[Callable[[], SluiceServer]]:
    """Starts a private sluice (for tests that stop it)."""
    started: List[SluiceServer] = []

    def start() -> SluiceServer:
        server = SluiceServer(sluice_bin)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def black_hole_url() -> Iterator[str]:
    """A loopback URL that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: List[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in accepted:
        conn.close()
    listener.close()


class AppServer:
    """A FastAPI app served by uvicorn in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # proxy_headers=False: uvicorn would otherwise rewrite request.client from
        # X-Forwarded-For for its default trusted 127.0.0.1, and the tests check
        # the client IP helpers themselves.
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            proxy_headers=False,
            lifespan="off",
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


@pytest.fixture
def serve() -> Iterator[Callable[[Any], AppServer]]:
    """Serves a FastAPI app over real HTTP; stops it after the test."""
    servers: List[AppServer] = []

    def start(app: Any) -> AppServer:
        server = AppServer(app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def remaining(url: str, limit: str, key: str) -> Optional[int]:
    """The tightest `remaining` of `limit` for `key`, read with cost 0 (charges nothing)."""
    from sluice_client import Check, SluiceClient

    with SluiceClient(url, timeout=5, on_error="raise") as client:
        decision = client.check([Check(limit, key, cost=0)])
    return min(r.remaining for r in decision.results) if decision.results else None
