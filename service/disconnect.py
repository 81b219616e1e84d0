"""Stop a request's work when its client hangs up (ASGI `http.disconnect`), for any route.

Call `await until_disconnect(receive, work)` once the body has been read: the next ASGI message
can then only be `http.disconnect`, so one watcher task waits for it and, when it arrives,
cancels the task awaiting the work. The work's `CancelledError` unwinds through the service and
the batcher, which count the image as `hiera_dropped_total{reason="cancelled"}` and never send
it to the model, and the caller gets ClientDisconnected (499).

The work runs in the caller's own task, not in one of its own: one task and one loop turn
fewer per request than running it beside the watcher and waiting for the first of the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from service.errors import ClientDisconnected

__all__ = ["ClientDisconnected", "until_disconnect"]

T = TypeVar("T")


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client hangs up first."""
    task = asyncio.current_task()
    assert task is not None, "until_disconnect runs inside a task"
    hung_up = False

    async def watch() -> None:
        nonlocal hung_up
        # Only reached after the body is read: any remaining message means the client left.
        while (await receive())["type"] != "http.disconnect":
            pass
        hung_up = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        # Ours alone (no shutdown cancelled the request too): the client left.
        if hung_up and task.uncancel() == 0:
            raise ClientDisconnected() from None
        raise
    finally:
        # Synchronous: once the work is over the watcher must never cancel this task, and
        # cancelling it here, before it next runs, guarantees that.
        watcher.cancel()
        if watcher.done() and not watcher.cancelled():
            watcher.exception()  # a receive() that failed: retrieved, so asyncio stays quiet
