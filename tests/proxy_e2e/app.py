"""The small FastAPI app the proxy tests put sluice in front of.

- `POST /chat/message`: a server-sent-event stream. It sends its first event at once,
  then waits until the test calls `release()` (or 2 s pass) before it sends the rest,
  so a test can tell whether that first event reached the client before the end.
- `GET /health`: always 200.
- `GET /search?q=...`: 200 with results, or 404 for `q=missing`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncIterator, Dict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class StreamControl:
    """Lets a test hold the chat stream after its first event."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.finished = threading.Event()
        self.first_sent_at = 0.0

    def release(self) -> None:
        self.released.set()


def make_app(control: StreamControl) -> FastAPI:
    app = FastAPI()

    @app.post("/chat/message")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.body()

        async def events() -> AsyncIterator[bytes]:
            control.first_sent_at = time.monotonic()
            yield b"data: first\n\n"
            deadline = time.monotonic() + 2.0
            while not control.released.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            for i in range(3):
                yield f"data: token {i}\n\n".encode()
            yield b"data: echo " + body + b"\n\n"
            control.finished.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/search")
    async def search(q: str = "") -> JSONResponse:
        if q == "missing":
            return JSONResponse({"detail": "no such thing"}, status_code=404)
        return JSONResponse({"q": q, "results": [f"{q} 1", f"{q} 2"]})

    return app
