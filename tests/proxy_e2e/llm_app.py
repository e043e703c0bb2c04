"""A fake OpenAI- and Anthropic-compatible LLM API for the metered-route tests.

Every answer reports usage numbers drawn at random, and the app writes down what it
reported per caller (`X-User-Id`) in `Ledger`, so a test can check that what sluice
spent is exactly what the app said the calls used.

- `POST /v1/chat/completions`: Chat Completions. A JSON answer with `usage`, or with
  `"stream": true` a server-sent-event stream of chunks whose last chunk before
  `[DONE]` carries the usage when the request set `stream_options.include_usage`. With
  `"model": "slow"` the stream sends its first chunk at once and holds the rest until
  the test releases it (or 5 s pass), so a test can tell whether chunks arrive as they
  are written and what happens when the client leaves in between.
- `POST /v1/messages`: Anthropic Messages, always streamed: `message_start` with the
  input (and cache) tokens, deltas, `message_delta` with the output tokens.
- `POST /v2/chat/completions`: Chat Completions that report no usage at all.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Reported:
    """One call's usage as the app reported it."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0

    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def money(self, input_weight: int, output_weight: int) -> int:
        # Cached reads are charged as input: the test's weights set no cached_input.
        return self.input_tokens * input_weight + self.output_tokens * output_weight


@dataclass
class Ledger:
    """What the app reported, per caller, and the test's hold on the slow stream."""

    by_user: Dict[str, List[Reported]] = field(default_factory=dict)
    released: threading.Event = field(default_factory=threading.Event)
    slow_finished: threading.Event = field(default_factory=threading.Event)
    slow_cancelled: threading.Event = field(default_factory=threading.Event)
    rng: random.Random = field(default_factory=random.Random)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, user: str, usage: Reported) -> None:
        with self.lock:
            self.by_user.setdefault(user, []).append(usage)

    def reported(self, user: str) -> List[Reported]:
        with self.lock:
            return list(self.by_user.get(user, []))

    def draw(self, cached: bool = False) -> Reported:
        with self.lock:
            input_tokens = self.rng.randint(1, 4000)
            return Reported(
                input_tokens=input_tokens,
                output_tokens=self.rng.randint(1, 1500),
                cached_input_tokens=self.rng.randint(0, input_tokens) if cached else 0,
            )


def _openai_usage(usage: Reported) -> dict:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.tokens(),
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def make_llm_app(ledger: Ledger) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> object:
        body = await request.json()
        user = request.headers.get("x-user-id", "")
        model = body.get("model", "m")
        created = int(time.time())
        base = {"id": "chatcmpl-e2e", "created": created, "model": model}
        usage = ledger.draw(cached=True)
        if not body.get("stream"):
            ledger.report(user, usage)
            return JSONResponse(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Hello there"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _openai_usage(usage),
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: Optional[str] = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _sse({**base, "object": "chat.completion.chunk", "choices": [choice]})

        async def events() -> AsyncIterator[bytes]:
            slow = model == "slow"
            try:
                yield chunk({"role": "assistant", "content": "Hel"})
                if slow:
                    deadline = time.monotonic() + 5.0
                    while not ledger.released.is_set() and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                for piece in ["lo", " there"]:
                    yield chunk({"content": piece})
                yield chunk({}, "stop")
                if include_usage:
                    # Reported only once the usage chunk is written.
                    ledger.report(user, usage)
                    yield _sse(
                        {
                            **base,
                            "object": "chat.completion.chunk",
                            "choices": [],
                            "usage": _openai_usage(usage),
                        }
                    )
                yield b"data: [DONE]\n\n"
                if slow:
                    ledger.slow_finished.set()
            except asyncio.CancelledError:
                if slow:
                    ledger.slow_cancelled.set()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/messages")
    async def messages(request: Request) -> StreamingResponse:
        await request.json()
        user = request.headers.get("x-user-id", "")
        usage = ledger.draw()
        cache_write = ledger.rng.randint(0, 500)
        cache_read = ledger.rng.randint(0, 500)
        # Anthropic reports uncached input, cache writes and cache reads apart; every
        # one of them is input the call used.
        reported = Reported(
            input_tokens=usage.input_tokens + cache_write + cache_read,
            output_tokens=usage.output_tokens,
            cached_input_tokens=cache_read,
        )

        async def events() -> AsyncIterator[bytes]:
            def event(name: str, data: dict) -> bytes:
                return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

            yield event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_e2e",
                        "type": "message",
                        "role": "assistant",
                        "content": [],
                        "model": "claude-e2e",
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": usage.input_tokens,
                            "cache_creation_input_tokens": cache_write,
                            "cache_read_input_tokens": cache_read,
                            "output_tokens": 1,
                        },
                    },
                },
            )
            yield event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            for text in ["Hello", " there"]:
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                )
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            ledger.report(user, reported)
            yield event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": usage.output_tokens},
                },
            )
            yield event("message_stop", {"type": "message_stop"})

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v2/chat/completions")
    async def chat_without_usage(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(
            {
                "id": "chatcmpl-e2e-v2",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "m"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "No usage here"},
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    return app
