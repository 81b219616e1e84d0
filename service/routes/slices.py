"""Feed a request of many images to the model a slice at a time, as capacity frees.

A request of up to `window` images is admitted whole or refused whole, as everywhere. A
larger one (OpenAI's embeddings take 2,048 inputs) is refused only if not one image fits;
then its images are admitted one at a time while admission has room and fewer than `window`
of them are in flight, again each time one is answered: it never holds more
than `window` images of the service's capacity or of the batcher's queue, so single-image
requests keep being admitted and wait behind at most that many of its images. Each image's
deadline counts from its own admission; a wait for room longer than the request timeout
fails the request. All or nothing still: the first failure cancels the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from service.admission import Ticket
from service.batching import DeadlineExceeded, QueueFull
from service.inference import InferenceService, Outcome
from service.routes.protocol import all_or_nothing

# predict(index, deadline, ticket): one image's answer, releasing one image of the ticket.
Predict = Callable[[int, float, Ticket], Coroutine[Any, Any, Outcome]]


def window_of(service: InferenceService) -> int:
    """Return how many images of one request may be admitted at once: two batches' worth
    (one running, one forming) keeps the model busy without crowding out anyone else."""
    return max(1, min(2 * service.batch_cap, service.settings.max_images_per_request))


async def predict_in_slices(
    service: InferenceService, count: int, predict: Predict, window: int, deadline: float
) -> list[Outcome]:
    """Return the outcomes of images 0..count-1, in order, admitted `window` at a time.

    `deadline` is the request's, for the first slice; later images get their own.
    """
    timeout = service.settings.request_timeout_s
    if count <= window:
        whole = service.admit(count)  # QueueFull / NotReady now, before any decode
        try:
            return await all_or_nothing([predict(i, deadline, whole) for i in range(count)])
        finally:
            whole.release_all()
    first = service.admit(1)  # refused (429) only if not even one image fits now
    outcomes: list[Outcome | None] = [None] * count
    running: dict[asyncio.Task[Outcome], int] = {}

    def start(index: int, ticket: Ticket, by: float) -> None:
        running[asyncio.ensure_future(predict(index, by, ticket))] = index

    try:
        start(0, first, deadline)
        following = 1
        while True:
            while following < count and len(running) < window:
                ticket = _admit_one(service)
                if ticket is None:
                    break
                start(following, ticket, time.monotonic() + timeout)
                following += 1
            if running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    outcomes[running.pop(task)] = task.result()  # a failure ends it all
            elif following < count:
                await _room(service, within_s=timeout)  # none of ours in flight: wait
            else:
                break
    finally:
        for task in running:
            task.cancel()
        # Each image's predict releases its own ticket as it ends.
        await asyncio.gather(*running, return_exceptions=True)
        first.release_all()
    return [o for o in outcomes if o is not None]


def _admit_one(service: InferenceService) -> Ticket | None:
    try:
        return service.admit(1)
    except QueueFull:
        return None


async def _room(service: InferenceService, *, within_s: float) -> None:
    """Wait until some image is released anywhere, or fail the request after `within_s`."""
    assert service.admission is not None
    try:
        async with asyncio.timeout(within_s):
            await service.admission.freed()
    except TimeoutError:
        message = f"no room for the rest of the request within {within_s:g} s"
        raise DeadlineExceeded(message) from None
