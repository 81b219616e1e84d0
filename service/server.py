"""uvicorn's server, made to drain the service as soon as shutdown begins."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import uvicorn


class DrainingServer(uvicorn.Server):
    """Drain the service first, then shut down as uvicorn does.

    uvicorn stops listening and waits for open connections before it runs the app's lifespan
    shutdown, so a request stuck on a hung batch would hold shutdown for uvicorn's whole
    graceful timeout. Draining first answers every waiting request within --drain-timeout-s (a
    result, or 503 `shutting_down` with Retry-After); the connections then close at once. New
    requests that arrive meanwhile get 503 `not_ready` with Retry-After, not a refused
    connection.
    """

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._drain()
        await super().shutdown(sockets)
