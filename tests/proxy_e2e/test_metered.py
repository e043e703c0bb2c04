"""Metered LLM routes: the real `openai` SDK (and a plain httpx client for the Anthropic
format) calls a fake LLM API through sluice, and what sluice's budgets spent is exactly
what the API reported the calls used.

What sluice spent is read from its quota endpoint, as any client of the proxy can.
Settlements run just after an answer has passed through, so reads poll briefly.
"""

from __future__ import annotations

import math
import time
from typing import Dict, List, Tuple

import httpx
import openai
import pytest

from conftest import Sluice
from llm_app import Ledger, Reported

TOKENS = 100_000_000
DOLLARS = 1_000_000_000
SLOTS = 4


def client(proxy: Sluice, user: str, version: str = "v1") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/{version}",
        api_key="sk-e2e",
        default_headers={"X-User-Id": user},
        max_retries=0,
        timeout=20,
    )


def remaining(proxy: Sluice, user: str, path: str = "/v1/chat/completions") -> Dict[str, int]:
    response = httpx.get(
        proxy.url + "/_sluice/quota",
        params={"path": path, "method": "POST"},
        headers={"X-User-Id": user},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return {entry["limit"]: entry["remaining"] for entry in response.json()["limits"]}


def spent(proxy: Sluice, user: str, path: str = "/v1/chat/completions") -> Tuple[int, int]:
    left = remaining(proxy, user, path)
    return TOKENS - left["tokens_day"], DOLLARS - left["dollars_day"]


def wait_until_spent(
    proxy: Sluice, user: str, expected: Tuple[int, int], path: str = "/v1/chat/completions"
) -> None:
    deadline = time.monotonic() + 5
    now = spent(proxy, user, path)
    while now != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        now = spent(proxy, user, path)
    assert now == expected, f"spent (tokens, micro-dollars) {now}, the app reported {expected}"


def totals(reported: List[Reported]) -> Tuple[int, int]:
    return sum(r.tokens() for r in reported), sum(r.money(3, 15) for r in reported)


def estimate(messages: List[dict], max_tokens: int) -> int:
    """sluice's estimate: the prompt's text bytes / 4, rounded up, plus max_tokens."""
    text = sum(len(v.encode()) for m in messages for v in m.values())
    return math.ceil(text / 4) + max_tokens


MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_json_and_streamed_calls_spend_exactly_the_usage_the_app_reported(
    metered_proxy: Sluice, ledger: Ledger, user: str
) -> None:
    sdk = client(metered_proxy, user)
    for i in range(6):
        if i % 2 == 0:
            completion = sdk.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=2000
            )
            assert completion.choices[0].message.content == "Hello there"
            assert completion.usage is not None
        else:
            stream = sdk.chat.completions.create(
                model="m",
                messages=MESSAGES,
                max_tokens=2000,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Hello there"
            assert chunks[-1].usage is not None, "the SDK read the usage chunk"
    reported = ledger.reported(user)
    assert len(reported) == 6
    wait_until_spent(metered_proxy, user, totals(reported))
    assert remaining(metered_proxy, user)["chat_in_flight"] == SLOTS, "every slot came back"


def test_an_anthropic_stream_spends_its_input_cache_and_output_tokens(
    metered_proxy: Sluice, ledger: Ledger, user: str
) -> None:
    with httpx.Client(timeout=20) as http:
        for _ in range(3):
            with http.stream(
                "POST",
                metered_proxy.url + "/v1/messages",
                headers={"X-User-Id": user, "anthropic-version": "2023-06-01"},
                json={"model": "claude-e2e", "max_tokens": 2000, "stream": True, "messages": MESSAGES},
            ) as response:
                assert response.status_code == 200
                events = [line for line in response.iter_lines() if line.startswith("event: ")]
            assert events[0] == "event: message_start"
            assert events[-1] == "event: message_stop"
    reported = ledger.reported(user)
    assert len(reported) == 3
    wait_until_spent(metered_proxy, user, totals(reported), path="/v1/messages")


def test_an_answer_without_usage_is_charged_its_estimate(
    metered_proxy: Sluice, user: str
) -> None:
    sdk = client(metered_proxy, user, version="v2")
    completion = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=250)
    assert completion.usage is None
    # Without max_tokens, usage.default_output_tokens (300) is the output estimate.
    sdk.chat.completions.create(model="m", messages=MESSAGES)
    first = estimate(MESSAGES, 250)
    second = estimate(MESSAGES, 300)
    input_tokens = estimate(MESSAGES, 0)
    money = (input_tokens * 3 + 250 * 15) + (input_tokens * 3 + 300 * 15)
    wait_until_spent(metered_proxy, user, (first + second, money), path="/v2/chat/completions")


def test_streamed_chunks_arrive_as_the_app_writes_them(
    metered_proxy: Sluice, ledger: Ledger, user: str
) -> None:
    ledger.released.clear()
    ledger.slow_finished.clear()
    sdk = client(metered_proxy, user)
    started = time.monotonic()
    stream = sdk.chat.completions.create(
        model="slow",
        messages=MESSAGES,
        max_tokens=2000,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    first_at = time.monotonic() - started
    assert first.choices[0].delta.content == "Hel"
    # The app holds the rest for 5 s unless released: a proxy that buffered the stream
    # (to read its usage, say) would deliver the first chunk only after that.
    assert not ledger.slow_finished.is_set(), "the app is still streaming"
    assert first_at < 2.0, f"the first chunk came after {first_at:.2f} s"
    ledger.released.set()
    rest = list(chunks)
    # The app sets this after it has yielded its last chunk, which the client may have
    # read (and stopped at) before the app's generator runs on: wait for it, briefly.
    assert ledger.slow_finished.wait(5), "the app finished its stream"
    assert rest[-1].usage is not None
    wait_until_spent(metered_proxy, user, totals(ledger.reported(user)))


def test_a_client_that_leaves_mid_stream_frees_its_slot_at_once(
    metered_proxy: Sluice, ledger: Ledger, user: str
) -> None:
    ledger.released.clear()
    ledger.slow_cancelled.clear()
    sdk = client(metered_proxy, user)
    messages = [{"role": "user", "content": "Write a long story."}]
    stream = sdk.chat.completions.create(
        model="slow",
        messages=messages,
        max_tokens=700,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = next(iter(stream))
    assert first.choices[0].delta.content == "Hel"
    assert remaining(metered_proxy, user)["chat_in_flight"] == SLOTS - 1, "the call holds a slot"
    left = time.monotonic()
    stream.close()
    # The app would hold the stream for 5 s more; the slot is back long before.
    deadline = left + 3
    while remaining(metered_proxy, user)["chat_in_flight"] != SLOTS:
        assert time.monotonic() < deadline, "the slot came back when the client left"
        time.sleep(0.02)
    freed_after = time.monotonic() - left
    assert freed_after < 2.0, f"slot back after {freed_after:.2f} s"
    # An OpenAI stream reports its usage only at its end: the estimate stays.
    tokens = estimate(messages, 700)
    input_tokens = estimate(messages, 0)
    wait_until_spent(metered_proxy, user, (tokens, input_tokens * 3 + 700 * 15))
    assert ledger.reported(user) == [], "the app never reported a usage"
    ledger.released.set()


def test_a_spent_budget_refuses_the_next_call_with_the_usual_429(
    start_sluice, llm_app, ledger: Ledger, user: str
) -> None:
    proxy = start_sluice(
        f"""
limits:
  tokens_small: {{rate: 50/day, algorithm: fixed_window}}
routes:
  - match: {{path: /v1/chat/completions, methods: [POST]}}
    usage: {{format: openai, estimate: 10}}
    limits:
      - {{limit: tokens_small, key: "user:{{header.x-user-id}}", cost: usage}}
proxy:
  upstream: {llm_app.url}
  quota_path: /_sluice/quota
"""
    )
    sdk = client(proxy, user)
    # Random usage far above 50: the call is allowed at its estimate (10) and settled at
    # what it used, which puts the budget in debt.
    sdk.chat.completions.create(model="m", messages=MESSAGES)
    used = ledger.reported(user)[0].tokens()
    assert used > 50
    deadline = time.monotonic() + 5
    while remaining(proxy, user)["tokens_small"] != 0:
        assert time.monotonic() < deadline, "the usage was settled"
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="m", messages=MESSAGES)
    assert refused.value.status_code == 429
    assert refused.value.response.json()["limit"] == "tokens_small"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert len(ledger.reported(user)) == 1, "a refused call never reaches the app"
