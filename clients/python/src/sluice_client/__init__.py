"""Clients for the sluice rate limiter's decision API.

>>> from sluice_client import SluiceClient, Check
>>> sluice = SluiceClient("http://127.0.0.1:8080", on_error="allow")
>>> decision = sluice.check([Check("chat_user", "user:42"), Check("chat_ip", "203.0.113.7")])
>>> decision.allowed, decision.retry_after_seconds

A call whose cost is known only after it (an LLM answer's tokens) reserves an
estimate first and settles the real cost afterwards:

>>> with sluice.reserve([Check("tokens_day", "user:42")], cost=1200) as r:
...     answer = call_the_model(max_tokens=1000)
...     r.settle(answer.usage.total_tokens)

FastAPI support lives in :mod:`sluice_client.fastapi` (``pip install sluice-client[fastapi]``),
which is only imported when you import it.
"""

from ._client import TTL, AsyncSluiceClient, OnError, SluiceClient
from ._models import (
    Check,
    Decision,
    ReservationDenied,
    ReservationNotFound,
    Settlement,
    SluiceError,
    SluiceRequestError,
    SluiceUnavailable,
    WindowResult,
)
from ._reservation import AsyncReservation, PendingReservation, Reservation

__all__ = [
    "AsyncReservation",
    "AsyncSluiceClient",
    "Check",
    "Decision",
    "OnError",
    "PendingReservation",
    "Reservation",
    "ReservationDenied",
    "ReservationNotFound",
    "Settlement",
    "SluiceClient",
    "SluiceError",
    "SluiceRequestError",
    "SluiceUnavailable",
    "TTL",
    "WindowResult",
]

__version__ = "0.1.0"
