"""Failure semantics: transient vs sticky batch failures, a hung batch, bounded shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from service.app import create_app
from service.runtime.base import Backend
from tests.service.helpers import make_image, repository_settings, running, sample, wait_until

JPEG = {"Content-Type": "image/jpeg"}


class Faulty:
    """Wrap a backend so the next `fail_next` batches raise, then it recovers."""

    def __init__(self, inner: Backend, fail_next: int) -> None:
        self.inner = inner
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision
        self.fail_next = fail_next

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RuntimeError("CUDA error: out of memory (secret internals)")
        return self.inner.infer(batch)

    def close(self) -> None:
        self.inner.close()


class Hanging:
    """Wrap a backend so every batch blocks until released (or the test ends)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision
        self.release = threading.Event()

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.release.wait(timeout=20)
        return self.inner.infer(batch)

    def close(self) -> None:
        self.release.set()
        self.inner.close()


def _wrap(app: object, wrapper: type, *args: object) -> object:
    instance = app.state.service.pool.instances[0]  # type: ignore[attr-defined]
    instance.backend = wrapper(instance.backend, *args)
    return instance.backend


async def test_one_failed_batch_fails_only_its_requests(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, max_consecutive_failures=2))
    async with running(app) as client:
        _wrap(app, Faulty, 1)
        failed = await client.post("/v1/classify", content=make_image(0), headers=JPEG)
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        after = await client.post("/v1/classify", content=make_image(1), headers=JPEG)
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "internal_error" and "secret" not in failed.text
    assert error["request_id"] == failed.headers["x-request-id"]
    assert (ready.status_code, live.status_code, after.status_code) == (200, 200, 200)
    assert sample(app, "hiera_batch_failures_total") == 1
    assert sample(app, "hiera_runtime_broken") == 0
    assert sample(app, "hiera_failures_total", reason="internal_error") == 1


async def test_consecutive_failures_break_readiness_and_liveness(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, max_consecutive_failures=2))
    async with running(app) as client:
        _wrap(app, Faulty, 10)
        first = await client.post("/v1/classify", content=make_image(0), headers=JPEG)
        still = await client.get("/health/live")
        second = await client.post("/v1/classify", content=make_image(1), headers=JPEG)
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        after = await client.post("/v1/classify", content=make_image(2), headers=JPEG)
    assert (first.status_code, still.status_code, second.status_code) == (500, 200, 500)
    assert ready.status_code == 503 and ready.json()["state"] == "failed"
    assert live.status_code == 503 and live.json()["status"] == "broken"
    assert live.headers["retry-after"] == "5"
    assert live.json()["reason"] == "2 batches in a row failed"
    assert after.status_code == 503 and after.json()["error"]["code"] == "not_ready"
    assert sample(app, "hiera_batch_failures_total") == 2
    assert sample(app, "hiera_runtime_broken") == 1


async def test_a_success_resets_the_failure_streak(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, max_consecutive_failures=2))
    async with running(app) as client:
        backend = _wrap(app, Faulty, 1)
        codes = []
        for seed in range(3):
            if seed == 2:
                backend.fail_next = 1  # type: ignore[attr-defined]
            answer = await client.post("/v1/embed", content=make_image(seed), headers=JPEG)
            codes.append(answer.status_code)
        live = await client.get("/health/live")
    assert codes == [500, 200, 500]
    assert live.status_code == 200  # 1 + 1 failures, never 2 in a row


async def test_hung_batch_trips_the_watchdog(micro_repository: Path) -> None:
    settings = repository_settings(
        micro_repository, batch_timeout_s=0.4, request_timeout_s=0.3, drain_timeout_s=0.2
    )
    app = create_app(settings)
    async with running(app) as client:
        hang = _wrap(app, Hanging)
        before = await client.get("/health/ready")
        late = await client.post("/v1/embed", content=make_image(0), headers=JPEG)
        await wait_until(lambda: app.state.service.broken, within_s=5)
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")
        started = time.monotonic()
    # Leaving `running` closed the service while the batch still hangs.
    shutdown_s = time.monotonic() - started
    hang.release.set()  # type: ignore[attr-defined]
    assert before.status_code == 200
    assert live.status_code == 503
    assert late.status_code == 504
    assert ready.status_code == 503 and "batch_timeout_s" in ready.json()["reason"]
    assert app.state.service.abandoned_threads
    assert shutdown_s < 0.2 + 0.5 + 1.0  # drain timeout + grace + slack, not the 20 s hang
