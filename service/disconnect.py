"""Stop a request's work when its client hangs up (ASGI `http.disconnect`), for any route.

Call `until_disconnect(request, work)` once the body has been read: the next ASGI message can
then only be `http.disconnect`, so one task waits for it and cancels the work when it arrives.
The work's `CancelledError` unwinds through the service and the batcher, which count the image
as `hiera_dropped_total{reason="cancelled"}` and never send it to the model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from service.errors import ClientDisconnected

__all__ = ["ClientDisconnected", "until_disconnect"]

T = TypeVar("T")


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`, cancelling it and raising ClientDisconnected if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        if not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # let the service and batcher unwind and count the drop
    raise ClientDisconnected()


async def _disconnected(request: Request) -> None:
    # Only reached after the body is read: any remaining message means the client left.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
