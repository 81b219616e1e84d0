"""Readiness, failures, overload and shutdown: the service's promises beyond the happy path."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import service.engine.core
from service.app import create_app
from service.runtime.base import Backend
from tests.service.helpers import make_image, repository_settings, running, sample, wait_until

JPEG = {"Content-Type": "image/jpeg"}


class Gate:
    """Wrap a backend so each infer call waits until the test opens the gate."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision
        self.entered = threading.Event()
        self.opened = threading.Event()

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.entered.set()
        if not self.opened.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        return self.inner.infer(batch)

    def close(self) -> None:
        self.opened.set()
        self.inner.close()


class Exploding:
    def __init__(self, inner: Backend) -> None:
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("CUDA error: an illegal memory access (secret internals)")

    def close(self) -> None:
        pass


def _gate(app: object) -> Gate:
    instance = app.state.service.pool.instances[0]  # type: ignore[attr-defined]
    gate = Gate(instance.backend)
    instance.backend = gate
    return gate


async def test_not_ready_while_loading(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_plan = service.engine.core.plan

    def slow_plan(settings: object) -> object:
        release.wait(timeout=30)
        return real_plan(settings)  # type: ignore[arg-type]

    monkeypatch.setattr(service.engine.core, "plan", slow_plan)
    app = create_app(repository_settings(micro_repository))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            loading = await client.get("/health/ready")
            early = await client.post("/v1/classify", content=make_image(0), headers=JPEG)
            live = await client.get("/health/live")
            release.set()
            await app.state.service.loaded.wait()
            ready = await client.get("/health/ready")
    assert (loading.status_code, loading.json()["state"]) == (503, "loading")
    assert loading.headers["retry-after"] == "5"
    assert (early.status_code, early.json()["error"]["code"]) == (503, "not_ready")
    assert live.status_code == 200 and ready.status_code == 200


async def test_load_failure_flips_readiness_and_reports(tmp_path: Path) -> None:
    fatal: list[BaseException] = []
    app = create_app(repository_settings(tmp_path / "missing"), on_fatal=fatal.append)
    async with running(app) as client:
        ready = await client.get("/health/ready")
        answer = await client.post("/v1/embed", content=make_image(0), headers=JPEG)
    assert ready.status_code == 503 and ready.json()["state"] == "failed"
    assert answer.status_code == 503
    assert len(fatal) == 1 and "hiera-export" in str(fatal[0])


async def test_queue_full_answers_429_fast(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, max_batch_size=1, max_queue_size=1))
    async with running(app) as client:
        gate = _gate(app)
        first = asyncio.create_task(client.post("/v1/embed", content=make_image(0), headers=JPEG))
        await asyncio.to_thread(gate.entered.wait, 10)  # first is inside the model
        second = asyncio.create_task(client.post("/v1/embed", content=make_image(1), headers=JPEG))
        await wait_until(lambda: app.state.service.batcher.queue_depth == 1)  # second queued
        third = await client.post("/v1/embed", content=make_image(2), headers=JPEG)
        gate.opened.set()
        results = await asyncio.gather(first, second)
    assert (third.status_code, third.json()["error"]["code"]) == (429, "queue_full")
    assert third.headers["retry-after"] == "1"
    assert [r.status_code for r in results] == [200, 200]  # accepted requests all answered


async def test_deadline_gives_504(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, request_timeout_s=0.3))
    async with running(app) as client:
        gate = _gate(app)
        late = await client.post("/v1/embed", content=make_image(0), headers=JPEG)
        gate.opened.set()
        fine = await client.post("/v1/embed", content=make_image(1), headers=JPEG)
    assert (late.status_code, late.json()["error"]["code"]) == (504, "deadline_exceeded")
    assert sample(app, "hiera_failures_total", reason="deadline_exceeded") == 1
    assert fine.status_code == 200


async def test_shutdown_drains_accepted_requests(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, max_batch_size=1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        context = app.router.lifespan_context(app)
        await context.__aenter__()
        service = app.state.service
        await service.loaded.wait()
        gate = _gate(app)
        running = asyncio.create_task(client.post("/v1/embed", content=make_image(0), headers=JPEG))
        await asyncio.to_thread(gate.entered.wait, 10)
        queued = asyncio.create_task(client.post("/v1/embed", content=make_image(1), headers=JPEG))
        await wait_until(lambda: service.batcher.queue_depth == 1)  # not yet sent to the model
        closing = asyncio.create_task(context.__aexit__(None, None, None))
        await wait_until(lambda: service.state == "draining")
        refused = await client.post("/v1/embed", content=make_image(2), headers=JPEG)
        ready = await client.get("/health/ready")
        gate.opened.set()
        drained = await asyncio.gather(running, queued)
        await closing
    # Both accepted requests are answered, the one still queued included.
    assert [r.status_code for r in drained] == [200, 200]
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "not_ready")
    assert refused.headers["retry-after"] == "5"
    assert ready.status_code == 503 and ready.json()["state"] == "draining"
    assert service.state == "stopped"


async def test_drain_timeout_answers_a_hung_request_with_503_and_retry_after(
    micro_repository: Path,
) -> None:
    app = create_app(repository_settings(micro_repository, drain_timeout_s=0.2))
    async with running(app) as client:
        gate = _gate(app)
        stuck = asyncio.create_task(client.post("/v1/embed", content=make_image(0), headers=JPEG))
        await asyncio.to_thread(gate.entered.wait, 10)
        await app.state.service.drain()  # what the server does first when shutdown begins
        answer = await stuck
        gate.opened.set()
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "shutting_down")
    assert answer.headers["retry-after"] == "5"
    assert sample(app, "hiera_request_outcomes_total", endpoint="embed", outcome="rejected") == 1
    assert sample(app, "hiera_requests_received_total", endpoint="embed") == 1


async def test_loading_imports_the_image_codecs_before_the_first_request(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow imports its format plugins on its first decode, holding the GIL for tens of ms:
    # the service does it while loading, on a decode thread, not inside a request.
    import PIL.Image

    threads: list[str] = []
    real = PIL.Image.init

    def init() -> bool:
        threads.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(PIL.Image, "init", init)
    app = create_app(repository_settings(micro_repository))
    async with running(app):
        assert threads and threads[0].startswith("hiera-decode")
