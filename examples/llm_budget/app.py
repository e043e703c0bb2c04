"""A chat backend that spends each user's daily LLM token budget through sluice.

Before calling the model, an endpoint cannot know what the call will cost: the
answer's length is known only afterwards. So it reserves the most the call can cost
(``max_tokens`` plus an estimate of the prompt) against the user's daily budget,
calls the model, and settles what the model reported (``usage.total_tokens``): the
unused part of the estimate comes back; a prompt that cost more than estimated is
charged too, past the budget if need be. A user whose next call may not fit gets 429
with ``Retry-After`` before the model is called.

    sluice serve --config examples/llm_budget/sluice.yaml
    uvicorn fake_openai:app --port 8001       # or any OpenAI-compatible server
    OPENAI_BASE_URL=http://127.0.0.1:8001/v1 uvicorn app:app --port 8000
    curl -s localhost:8000/chat -H 'x-user-id: 42' -H 'content-type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 200}'
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Literal

import openai
from fastapi import FastAPI, Header, HTTPException
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, Field

from sluice_client import AsyncSluiceClient, Check
from sluice_client.fastapi import Limiter

MODEL = os.environ.get("LLM_MODEL", "fake-gpt")

llm = openai.AsyncOpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8001/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "not-needed-by-the-fake"),
    max_retries=0,
    timeout=60,
)
# Fail closed: without sluice nobody can say what a user has left, and calls cost money.
limiter = Limiter(
    AsyncSluiceClient(os.environ.get("SLUICE_URL", "http://127.0.0.1:8080"), on_error="deny")
)

app = FastAPI(title="llm_budget example")
limiter.install(app)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str

    def to_openai(self) -> ChatCompletionMessageParam:
        if self.role == "system":
            return {"role": "system", "content": self.content}
        if self.role == "assistant":
            return {"role": "assistant", "content": self.content}
        return {"role": "user", "content": self.content}


class ChatRequest(BaseModel):
    messages: List[Message] = Field(min_length=1)
    max_tokens: int = Field(256, ge=1, le=2048)


def estimate_prompt_tokens(messages: List[Message]) -> int:
    """About 4 characters a token, plus a few per message for the chat format. It
    need not be exact: settling charges the difference either way."""
    return sum(len(m.content) // 4 + 4 for m in messages) + 3


@app.post("/chat")
async def chat(body: ChatRequest, x_user_id: str = Header()) -> Dict[str, Any]:
    user = f"user:{x_user_id}"
    estimate = body.max_tokens + estimate_prompt_tokens(body.messages)
    checks = [
        Check("llm_tokens_day", user, cost=estimate),
        Check("llm_in_flight", user),  # one slot while the call runs
    ]
    # Denied: 429 with Retry-After (503 while sluice is down), and the model is not called.
    async with limiter.reserve(checks, ttl=120) as reservation:
        try:
            completion = await llm.chat.completions.create(
                model=MODEL,
                messages=[m.to_openai() for m in body.messages],
                max_tokens=body.max_tokens,
            )
        except openai.APITimeoutError as exc:
            # The provider may have done (and billed) the work: keep the estimate.
            await reservation.settle(estimate)
            raise HTTPException(504, "the model timed out") from exc
        except openai.APIError as exc:
            # Raised inside the block: the reservation is released (nothing was used).
            raise HTTPException(502, f"the model failed: {type(exc).__name__}") from exc
        # One actual cost for every check: the tokens; a concurrency check's cost does
        # not matter, settling frees its slot. Without usage, keep the estimate.
        spent = completion.usage.total_tokens if completion.usage else estimate
        await reservation.settle(spent)
    return {
        "reply": completion.choices[0].message.content,
        "usage": completion.usage.model_dump() if completion.usage else None,
        "reserved": estimate,
    }
