"""A stand-in for an OpenAI-compatible API, for the llm_budget example and its test.

``POST /v1/chat/completions`` answers a JSON chat completion with ``usage``, counted
by its own tokenizer (one token per 3 characters of prompt, 3 more per message and 3
to prime the answer), which is not the app's estimate: as with a real model, the app
learns the real cost only from the answer. The reply is twice as many words as the
last user message plus 5, one token a word, cut at ``max_tokens``
(``finish_reason: "length"``).

``GET /_ledger`` is what it billed since it started: calls and tokens.

    uvicorn fake_openai:app --port 8001
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Dict

from fastapi import FastAPI, HTTPException, Request

app = FastAPI(title="fake OpenAI-compatible API")

ledger: Dict[str, int] = {
    "calls": 0,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "total_tokens": 0,
}


def text_of(message: Dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return " ".join(str(part.get("text", "")) for part in content)
    return str(content)


def count_tokens(text: str) -> int:
    return math.ceil(len(text) / 3)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Dict[str, Any]:
    body = await request.json()
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPException(400, "messages is required")
    if body.get("stream"):
        raise HTTPException(400, "this fake does not stream")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    prompt_tokens = sum(3 + count_tokens(text_of(m)) for m in messages) + 3
    question = next((text_of(m) for m in reversed(messages) if m.get("role") == "user"), "")
    wanted = 2 * len(question.split()) + 5
    completion_tokens = min(int(max_tokens), wanted)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    ledger["calls"] += 1
    for name, value in usage.items():
        ledger[name] += value
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(["bla"] * completion_tokens)},
                "finish_reason": "length" if completion_tokens < wanted else "stop",
            }
        ],
        "usage": usage,
    }


@app.get("/_ledger")
async def get_ledger() -> Dict[str, int]:
    return dict(ledger)
