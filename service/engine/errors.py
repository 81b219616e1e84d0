"""The errors a front end sees from an engine it reaches over the corridor."""

from __future__ import annotations

from service.batching import BatcherError


class EngineUnavailable(BatcherError):
    """The engine died, hung or restarts: every waiting request gets a 503 at once."""

    code = "engine_unavailable"


def describe_failure(exc: BaseException) -> str:
    """Say why loading failed in words safe to show a client (our messages; else the type)."""
    if isinstance(exc, EngineUnavailable | ConnectionError | OSError | ValueError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__} while loading"
