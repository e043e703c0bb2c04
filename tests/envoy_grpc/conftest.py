"""Fixtures: stubs generated from the vendored Envoy protos, and a real `sluice serve`
with an `envoy:` section on free loopback ports."""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, List

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "crates" / "envoy" / "proto"


def _generate_stubs() -> Path:
    """Compiles the protos sluice serves with grpcio-tools (protoc bundled in the wheel)."""
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="sluice-envoy-stubs-"))
    # The stubs are imported for the whole session; remove them when it ends.
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = Path(importlib.import_module("grpc_tools").__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto")]
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {files}")
    return out


sys.path.insert(0, str(_generate_stubs()))
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2  # noqa: E402
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc  # noqa: E402


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


class Sluice:
    """One `sluice serve` process: HTTP and gRPC listeners on free loopback ports."""

    def __init__(self, binary: Path, envoy_section: str, files: dict | None = None) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="sluice-envoy-")
        self.dir = Path(self._dir.name)
        for name, text in (files or {}).items():
            (self.dir / name).write_text(text)
        self.config_path = self.dir / "sluice.yaml"
        self.config_path.write_text(
            f"listen: 127.0.0.1:{self.http_port}\n"
            "storage: {backend: memory, max_keys: 100000}\n"
            + envoy_section.replace("GRPC_PORT", str(self.grpc_port))
        )
        self.log_path = self.dir / "sluice.log"
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        self.process = subprocess.Popen(
            [str(binary), "serve", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sluice exited at start:\n{self.log()}")
            try:
                grpc.channel_ready_future(self.channel).result(timeout=0.5)
                break
            except grpc.FutureTimeoutError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"sluice's gRPC listener did not come up:\n{self.log()}")
        self.stub = rls_pb2_grpc.RateLimitServiceStub(self.channel)

    def call(self, domain: str, *descriptors, hits_addend: int = 0) -> rls_pb2.RateLimitResponse:
        """`ShouldRateLimit` with descriptors given as lists of (key, value) pairs, or as
        `RateLimitDescriptor` messages."""
        built = [
            d
            if isinstance(d, ratelimit_pb2.RateLimitDescriptor)
            else ratelimit_pb2.RateLimitDescriptor(
                entries=[
                    ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in d
                ]
            )
            for d in descriptors
        ]
        request = rls_pb2.RateLimitRequest(
            domain=domain, descriptors=built, hits_addend=hits_addend
        )
        return self.stub.ShouldRateLimit(request, timeout=10)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        self._dir.cleanup()


@pytest.fixture(scope="session")
def sluice_bin() -> Path:
    return sluice_binary()


@pytest.fixture
def start_sluice(sluice_bin: Path) -> Iterator[Callable[..., Sluice]]:
    """Starts a sluice with the given `envoy:` section (GRPC_PORT is filled in)."""
    started: List[Sluice] = []

    def start(envoy_section: str, files: dict | None = None) -> Sluice:
        server = Sluice(sluice_bin, envoy_section, files)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
