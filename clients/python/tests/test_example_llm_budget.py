"""examples/llm_budget end to end: the real sluice binary on the example's config, the
fake OpenAI-compatible model and the example app each under their own uvicorn, the app
calling the model through the OpenAI SDK. What sluice counted must be what the model
billed, and a user whose next call may not fit is refused before the model is called.

The budget is a fixed window ending at 00:00 UTC: a run that crosses midnight UTC
starts the count over and fails the equality checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import httpx
import pytest
from conftest import REPO, SluiceServer, free_port, remaining

EXAMPLE = REPO / "examples" / "llm_budget"
LIMIT = "llm_tokens_day"


class Uvicorn:
    """``python -m uvicorn module:app`` in the example's directory, on a free port."""

    def __init__(self, target: str, env: Dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.log_path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=EXAMPLE,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log_path.name} exited at start:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/openapi.json", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.log_path.name}: did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


class Stack:
    def __init__(self, sluice: SluiceServer, model: Uvicorn, app: Uvicorn) -> None:
        self.sluice, self.model, self.app = sluice, model, app


@pytest.fixture
def stack(sluice_bin: Path, tmp_path: Path) -> Iterator[Stack]:
    config = (EXAMPLE / "sluice.yaml").read_text()
    assert "listen: 127.0.0.1:8080" in config
    # SluiceServer formats the config with the port; the example's is block YAML.
    sluice = SluiceServer(sluice_bin, config.replace("127.0.0.1:8080", "127.0.0.1:{port}"))
    started: List[Uvicorn] = []
    try:
        model = Uvicorn("fake_openai:app", {}, tmp_path / "model.log")
        started.append(model)
        app = Uvicorn(
            "app:app",
            {"SLUICE_URL": sluice.url, "OPENAI_BASE_URL": model.url + "/v1", "OPENAI_API_KEY": "x"},
            tmp_path / "app.log",
        )
        started.append(app)
        for server in started:  # started together: importing them is the slow part
            server.wait_ready()
        yield Stack(sluice, model, app)
    finally:
        for server in reversed(started):
            server.stop()
        sluice.close()


def chat(http: httpx.Client, stack: Stack, user: str, words: int, max_tokens: int) -> httpx.Response:
    question = " ".join(["word"] * words)
    return http.post(
        stack.app.url + "/chat",
        headers={"x-user-id": user},
        json={"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": question}],
              "max_tokens": max_tokens},
    )


def ledger(http: httpx.Client, stack: Stack) -> Dict[str, int]:
    answer: Dict[str, int] = http.get(stack.model.url + "/_ledger").json()
    return answer


def spent(stack: Stack, user: str) -> int:
    left = remaining(stack.sluice.url, LIMIT, f"user:{user}")
    assert left is not None
    return 5000 - left


def test_tokens_spent_in_sluice_are_what_the_model_billed(
    stack: Stack, http: httpx.Client
) -> None:
    usages: List[Dict[str, Any]] = []
    # A short question, room for a long answer: the model uses less than reserved
    # (refund). A long question, a short max_tokens: the prompt costs more than the
    # app estimated and the answer hits max_tokens, so more than reserved (debt).
    for words, max_tokens, more_than_reserved in [
        (3, 500, False),
        (60, 20, True),
        (600, 1000, True),
        (600, 1000, True),
    ]:
        response = chat(http, stack, "alice", words, max_tokens)
        assert response.status_code == 200, response.text
        body = response.json()
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert (usage["total_tokens"] > body["reserved"]) == more_than_reserved, body
        usages.append(usage)
        billed = ledger(http, stack)
        assert billed["calls"] == len(usages)
        assert billed["total_tokens"] == sum(u["total_tokens"] for u in usages)
        assert spent(stack, "alice") == billed["total_tokens"], "sluice counted what the model billed"

    # Alice has about 800 tokens left; a call that may cost 1000 + the prompt does
    # not fit: refused before the model is called.
    left = 5000 - spent(stack, "alice")
    assert 0 < left < 1000
    denied = chat(http, stack, "alice", 600, 1000)
    assert denied.status_code == 429, denied.text
    retry_after = int(denied.headers["retry-after"])
    assert 1 <= retry_after <= 86_400  # until 00:00 UTC
    body = denied.json()
    assert body["error"] == "rate_limited" and body["limit"] == LIMIT
    assert body["retry_after_seconds"] == retry_after
    assert ledger(http, stack)["calls"] == 4, "the model was not called"
    assert 5000 - spent(stack, "alice") == left, "the denial charged nothing"
    # A call that fits what is left still runs.
    small = chat(http, stack, "alice", 3, 50)
    assert small.status_code == 200, small.text
    assert spent(stack, "alice") == ledger(http, stack)["total_tokens"]

    # Another user's budget is their own.
    bob = chat(http, stack, "bob", 600, 1000)
    assert bob.status_code == 200, bob.text
    assert spent(stack, "bob") == bob.json()["usage"]["total_tokens"]

    # Every call's slot in llm_in_flight came back: two calls at once per user fit.
    # (A concurrency limit can only be reserved, so ask sluice directly.)
    from sluice_client import Check, SluiceClient

    with SluiceClient(stack.sluice.url, timeout=5, on_error="raise") as client:
        held = [client.reserve([Check("llm_in_flight", "user:alice")]) for _ in range(2)]
        assert all(r.allowed for r in held)
        for r in held:
            r.release()


def test_a_model_that_fails_costs_nothing(stack: Stack, http: httpx.Client) -> None:
    # A request without messages is refused by the app (422) before anything is
    # reserved; a model that cannot be reached is a 502 and the reservation is
    # released, so the user keeps the budget the call never used.
    assert http.post(
        stack.app.url + "/chat", headers={"x-user-id": "carol"}, json={"messages": []}
    ).status_code == 422
    stack.model.stop()  # the model is down
    response = chat(http, stack, "carol", 3, 100)
    assert response.status_code == 502, response.text
    assert spent(stack, "carol") == 0, "the reservation was released"
