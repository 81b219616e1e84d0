"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`; health stays open."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError, error_response
from service.metrics import Metrics

# Probes come from the orchestrator, which holds no key; they reveal nothing about the model.
OPEN_PREFIXES = ("/health/", "/v2/health/")


def load_keys(keys: Iterable[str], keys_file: Path | None) -> list[bytes]:
    """Collect the accepted keys from the settings and the key file (one per line, # comments)."""
    found = [k.strip() for k in keys if k.strip()]
    if keys_file is not None:
        for line in keys_file.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return [k.encode() for k in found]


class KeyRing:
    """The accepted keys, and the check of what a request presents against them."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self.keys = list(keys)

    def admits(self, scope: Scope) -> bool:
        """Tell whether the request carries one of the keys; every key is compared in
        constant time, whichever matches, so the time taken says nothing about which."""
        presented = _presented(scope)
        if presented is None:
            return False
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(presented, key)
        return matched


class ApiKeyMiddleware:
    """Answer 401 unless the request carries one of the keys; compare in constant time."""

    def __init__(self, app: ASGIApp, *, keys: KeyRing, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":  # CORS preflight carries no credentials
            await self.app(scope, receive, send)
            return
        if self.keys.admits(scope):
            await self.app(scope, receive, send)
            return
        self.metrics.failed("unauthorized")
        error = ApiError(
            401,
            "unauthorized",
            "a valid API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            {"WWW-Authenticate": 'Bearer realm="hiera-serve"'},
        )
        await error_response(error)(scope, receive, send)


def _presented(scope: Scope) -> bytes | None:
    """Return the key the client sent, from X-API-Key or a Bearer Authorization header."""
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return bytes(value).strip()
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
    return None
