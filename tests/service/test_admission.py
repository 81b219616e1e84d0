"""Admission control: whole requests admitted or refused before decode; drain-rate Retry-After."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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
