"""Clients for the sluice rate limiter's decision API.

>>> from sluice_client import SluiceClient, Check
>>> sluice = SluiceClient("http://127.0.0.1:8080", on_error="allow")
>>> decision = sluice.check([Check("chat_user", "user:42"), Check("chat_ip", "203.0.113.7")])
>>> decision.allowed, decision.retry_after_seconds

FastAPI support lives in :mod:`sluice_client.fastapi` (``pip install sluice-client[fastapi]``),
which is only imported when you import it.
"""

from ._client import AsyncSluiceClient, OnError, SluiceClient
from ._models import (
    Check,
    Decision,
    SluiceError,
    SluiceRequestError,
    SluiceUnavailable,
    WindowResult,
)

__all__ = [
    "AsyncSluiceClient",
    "Check",
    "Decision",
    "OnError",
    "SluiceClient",
    "SluiceError",
    "SluiceRequestError",
    "SluiceUnavailable",
    "WindowResult",
]

__version__ = "0.1.0"
