"""Admission control: whole requests admitted or refused before decode; drain-rate Retry-After."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from service.admission import Admission
from service.app import create_app
from service.batching import QueueFull
from tests.service.helpers import make_image, repository_settings, running, sample, wait_until
from tests.service.test_lifecycle import JPEG, _gate


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_admits_up_to_capacity_and_refuses_whole_requests() -> None:
    admission = Admission(5)
    first = admission.admit(3)
    with pytest.raises(QueueFull):
        admission.admit(3)  # 3 + 3 > 5: refused whole, nothing half-admitted
    assert admission.outstanding == 3
    second = admission.admit(2)
    assert admission.outstanding == 5
    first.release(1)
    first.release_all()
    second.release_all()
    second.release_all()  # releasing twice gives nothing back twice
    assert admission.outstanding == 0


def test_retry_after_follows_the_measured_drain_rate() -> None:
    clock = FakeClock()
    admission = Admission(100, clock=clock)
    ticket = admission.admit(100)
    with pytest.raises(QueueFull) as unknown:
        admission.admit(1)
    assert unknown.value.retry_after_s == 1  # no rate measured yet
    for _ in range(11):  # 11 completions over 10 s: 1 image per second
        ticket.release(1)
        clock.now += 1.0
    clock.now -= 1.0
    assert admission.drain_rate == pytest.approx(1.0)
    with pytest.raises(QueueFull) as measured:
        admission.admit(90)
    assert measured.value.retry_after_s == 60  # 89 queued at 1/s, capped at a minute
    ticket.release(80, completed=False)  # e.g. refused images: no drain evidence
    with pytest.raises(QueueFull) as shorter:
        admission.admit(100)
    assert shorter.value.retry_after_s == 9  # 9 images left at 1 image/s


async def test_batch_request_is_refused_whole_before_decode(micro_repository: Path) -> None:
    # Capacity = queue 2 + one instance x batch 1 = 3 images.
    settings = repository_settings(micro_repository, max_batch_size=1, max_queue_size=2)
    app = create_app(settings)
    async with running(app) as client:
        gate = _gate(app)
        first = asyncio.create_task(client.post("/v1/embed", content=make_image(0), headers=JPEG))
        await asyncio.to_thread(gate.entered.wait, 10)
        files = [("images", (f"{i}.jpg", make_image(i), "image/jpeg")) for i in range(3)]
        pixels_before = sample(app, "hiera_image_pixels_count")
        started = time.perf_counter()
        refused = await client.post("/v1/embed/batch", files=files)
        refused_s = time.perf_counter() - started
        pixels_after_refusal = sample(app, "hiera_image_pixels_count")
        two = asyncio.create_task(client.post("/v1/embed/batch", files=files[:2]))
        await wait_until(lambda: app.state.service.admission.outstanding == 3)
        single = await client.post("/v1/embed", content=make_image(9), headers=JPEG)
        gate.opened.set()
        answers = await asyncio.gather(first, two)
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "queue_full")
    assert refused.headers["retry-after"] == "1"
    assert pixels_after_refusal == pixels_before  # not one of its images was decoded
    assert refused_s < 5  # answered without waiting for the gated model
    assert single.status_code == 429
    assert [a.status_code for a in answers] == [200, 200]
    assert [r["index"] for r in answers[1].json()["results"] if "result" in r] == [0, 1]
    assert app.state.service.admission.outstanding == 0


def test_every_admit_and_release_reports_the_outstanding_count() -> None:
    seen: list[int] = []
    admission = Admission(10, on_change=seen.append)
    ticket = admission.admit(4)
    ticket.release(1)
    ticket.release_all()  # what a batch request's route does when it finishes
    ticket.release_all()  # nothing left: no report
    assert seen == [4, 3, 0]


def test_refuses_what_the_backlog_cannot_finish_before_the_deadline() -> None:
    per_image = {"s": 0.5}
    admission = Admission(100, max_wait_s=2.0, backlog_seconds=lambda n: n * per_image["s"])
    first = admission.admit(4)  # idle: admitted whatever it needs (4 x 0.5 s = 2 s)
    with pytest.raises(QueueFull, match=r"need about 2\.5 s of model time, past the 2 s"):
        admission.admit(1)  # 5 images at 0.5 s: past the 2 s deadline
    assert admission.refusal(1) is not None and admission.outstanding == 4
    per_image["s"] = 0.25  # the model got faster (bigger batches): room again
    second = admission.admit(4)
    first.release_all()
    second.release_all()
    big = admission.admit(50)  # idle again: even 25 s of work is admitted, never starved
    big.release_all()


def test_no_deadline_refusal_before_the_model_time_is_measured() -> None:
    admission = Admission(10, max_wait_s=0.1, backlog_seconds=lambda n: None)
    tickets = [admission.admit(1) for _ in range(10)]
    assert admission.outstanding == 10
    for ticket in tickets:
        ticket.release_all()


async def test_the_batcher_measures_model_time_per_image() -> None:
    from service.batching import DynamicBatcher

    async def infer(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        await asyncio.sleep(0.05 * len(batch))
        return np.zeros((len(batch), 2), np.float32), np.zeros((len(batch), 2), np.float32)

    batcher = DynamicBatcher(
        infer, collate=list, max_batch_size=4, max_delay_ms=1, max_queue_size=8, concurrency=2
    )
    assert batcher.backlog_seconds(10) is None  # nothing measured yet
    await batcher.start()
    try:
        image = np.zeros((3, 4, 4), np.uint8)
        await asyncio.gather(*(batcher.submit(image) for _ in range(4)))
    finally:
        await batcher.close()
    estimate = batcher.backlog_seconds(10)
    assert estimate is not None
    assert 10 * 0.05 / 2 <= estimate < 10 * 0.08 / 2  # 10 images, 50 ms each, 2 at once


async def test_the_service_refuses_what_cannot_finish_before_the_timeout(
    micro_repository: Path,
) -> None:
    settings = repository_settings(micro_repository, max_batch_size=1, request_timeout_s=1.0)
    app = create_app(settings)
    async with running(app) as client:
        gate = _gate(app)
        # One image that holds the model for 0.6 s: the measured model time per image.
        first = asyncio.create_task(client.post("/v1/embed", content=make_image(0), headers=JPEG))
        await asyncio.to_thread(gate.entered.wait, 10)
        await asyncio.sleep(0.6)
        gate.opened.set()
        assert (await first).status_code == 200
        gate.opened.clear()
        gate.entered.clear()
        # One admitted image holds the model again; a second would need about 1.2 s: refused.
        held = asyncio.create_task(client.post("/v1/embed", content=make_image(1), headers=JPEG))
        await asyncio.to_thread(gate.entered.wait, 10)
        refused = await client.post("/v1/embed", content=make_image(2), headers=JPEG)
        gate.opened.set()
        answered = await held
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert answered.status_code == 200  # the one admitted still made its deadline


async def test_capacity_follows_the_batch_cap_the_batcher_really_uses(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.runtime.pool import RuntimePool

    # Warm-up found that batching does not pay: batches stay at 1 although up to 4 are allowed.
    monkeypatch.setattr(RuntimePool, "batch_cap", lambda self, max_batch_size: 1)
    settings = repository_settings(micro_repository, max_batch_size=4, max_queue_size=2)
    app = create_app(settings)
    async with running(app) as client:
        gate = _gate(app)
        held = [
            asyncio.create_task(client.post("/v1/embed", content=make_image(i), headers=JPEG))
            for i in range(3)
        ]
        await asyncio.to_thread(gate.entered.wait, 10)
        await wait_until(lambda: app.state.service.admission.outstanding == 3)
        await wait_until(lambda: app.state.service.batcher.queue_depth == 2)
        refused = await client.post("/v1/embed", content=make_image(9), headers=JPEG)
        gate.opened.set()
        answers = await asyncio.gather(*held)
    # 2 queued + 1 running: what the batcher can hold. Admitting a 4th (capacity 2 + 1 x 4)
    # would only have had the batcher refuse it after decoding.
    assert app.state.service.admission.capacity == 3
    assert refused.status_code == 429 and [a.status_code for a in answers] == [200] * 3


class _SharedLedger:
    """A ledger other processes also count in (as service.engine.shm.Board is)."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.mine = 0

    def take(self, count: int, capacity: int) -> bool:
        if self.outstanding + count > capacity:
            return False
        self.outstanding += count
        self.mine += count
        return True

    def give(self, count: int) -> None:
        self.outstanding -= count
        self.mine -= count


async def test_room_freed_by_another_front_end_is_seen_without_a_release_here() -> None:
    ledger = _SharedLedger()
    admission = Admission(2, ledger=ledger, drain_rate=lambda: None)
    ledger.outstanding = 2  # another front end holds all the room
    waiting = admission.freed()
    ledger.outstanding = 0  # ...and gives it back: no release happens in this process
    await asyncio.wait_for(waiting, 1.0)
    assert admission.admit(2).left == 2
    local = Admission(2)
    with pytest.raises(TimeoutError):  # a local ledger hears every release: no polling
        await asyncio.wait_for(local.freed(), 0.1)
