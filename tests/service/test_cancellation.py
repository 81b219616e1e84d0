"""Cancellation with a real server: clients that hang up cost no model time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import live_server, make_image
from tests.service.test_e2e import _counters

pytestmark = pytest.mark.slow

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture
def slow_batching_server(micro_repository: Path, tmp_path: Path) -> Iterator[str]:
    """A real server whose batches form only after 3 s (or 8 images): requests sit queued."""
    args = ("--max-batch-size", "8", "--max-delay-ms", "3000", "--batch-wait-when-idle",
            "--no-batch-cap-from-warmup")  # fmt: skip
    with live_server(micro_repository, tmp_path / "server.log", *args) as url:
        yield url


def test_clients_that_hang_up_never_reach_the_model(slow_batching_server: str) -> None:
    url = slow_batching_server
    before = _counters(httpx.get(f"{url}/metrics").text)

    async def give_up_after(seconds: float, seed: int) -> None:
        async with httpx.AsyncClient(timeout=seconds) as client:
            with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection on timeout
                await client.post(f"{url}/v1/embed", content=make_image(seed), headers=JPEG)

    async def impatient() -> None:
        await asyncio.gather(*(give_up_after(0.5, seed) for seed in range(5)))

    asyncio.run(impatient())

    def metric(values: dict, name: str, **labels: str) -> float:
        return values.get((name, tuple(sorted(labels.items()))), 0.0)

    deadline = time.monotonic() + 10
    while True:  # the server sees each hang-up a moment after the client closes
        after = _counters(httpx.get(f"{url}/metrics").text)
        cancelled = metric(after, "hiera_dropped_total", reason="cancelled") - metric(
            before, "hiera_dropped_total", reason="cancelled"
        )
        if cancelled >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(3.5)  # past the batch window: a batch would have run by now
    after = _counters(httpx.get(f"{url}/metrics").text)
    batches = metric(after, "hiera_batch_size_count") - metric(before, "hiera_batch_size_count")
    assert cancelled == 5
    assert batches == 0  # not one abandoned image went to the model
    # A patient client is still served, in a batch of its own.
    patient = httpx.post(f"{url}/v1/embed", content=make_image(9), headers=JPEG, timeout=30)
    assert patient.status_code == 200 and patient.json()["timing"]["batch_size"] == 1
    final = _counters(httpx.get(f"{url}/metrics").text)
    assert metric(final, "hiera_batch_size_count") - metric(before, "hiera_batch_size_count") == 1
