"""The corridor end to end in one event loop: a real EngineServer, front ends on its socket.

Each test runs the engine's server (service.engine.process.EngineServer, with the micro model)
and reaches it through `ProcessEngine`, the front end's door, over a real Unix socket and real
shared memory. The answers are compared with the in-process engine's on the same inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import imaging
from service.batching import DeadlineExceeded
from service.engine import wire
from service.engine.client import ProcessEngine
from service.engine.core import Engine
from service.engine.errors import EngineUnavailable
from service.engine.process import EngineServer
from service.engine.state import Want
from service.inference import InferenceService
from service.metrics import Metrics
from service.postprocess import softmax, top_k
from service.runtime.pool import RuntimePool
from service.settings import Settings
from tests.service.helpers import make_image, repository_settings, wait_until

FULL = Want(top_k=5, embedding=True, logits=True)


def _settings(repository: Path, **overrides: Any) -> Settings:
    # One instance: a batch in the model means the next input waits in the queue.
    return repository_settings(
        repository, adaptive_layout=False, max_queue_size=8, max_batch_size=2, **overrides
    )


@contextlib.asynccontextmanager
async def engine_server(
    settings: Settings, path: Path, *, decode_on: str | None = None
) -> AsyncIterator[EngineServer]:
    server = EngineServer(settings, str(path), metrics=Metrics(), decode_on=decode_on)
    task = asyncio.create_task(server.run(signals=False))
    await wait_until(lambda: path.exists() or task.done(), within_s=60)
    assert not task.done(), "the engine server ended while loading"
    try:
        yield server
    finally:
        server.stop()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def front_end(settings: Settings, path: Path) -> AsyncIterator[InferenceService]:
    front = settings.model_copy(update={"engine": "process", "engine_socket": path})
    service = InferenceService(front, Metrics())
    await asyncio.wait_for(service.load(), 30)
    try:
        yield service
    finally:
        await service.close()


@contextlib.asynccontextmanager
async def inline(settings: Settings) -> AsyncIterator[InferenceService]:
    service = InferenceService(settings, Metrics())
    await service.load()
    try:
        yield service
    finally:
        await service.close()


async def _predict(service: InferenceService, seed: int, want: Want = FULL) -> Any:
    ticket = service.admit(1)
    deadline = time.monotonic() + 30
    return await service.predict(make_image(seed), "classify", deadline, ticket=ticket, want=want)


async def test_answers_across_the_corridor_equal_the_in_process_engine(
    micro_repository: Path, tmp_path: Path
) -> None:
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with engine_server(settings, path), front_end(settings, path) as split:
        assert isinstance(split.engine, ProcessEngine)
        remote = await asyncio.gather(*(_predict(split, seed) for seed in range(6)))
    async with inline(settings) as local:
        assert isinstance(local.engine, Engine)
        mine = [await _predict(local, seed) for seed in range(6)]
    labels = split.card.labels if split.card else []
    for there, here in zip(remote, mine, strict=True):
        a, b = there.result, here.result
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=0, atol=1e-5)
        # The engine ranked the classes; the front end only labelled them.
        best = top_k(b.logits, labels, 5)
        sent = a.outputs.top_k(0, labels, 5)
        assert [p.index for p in sent] == [p.index for p in best]
        assert [p.label for p in sent] == [p.label for p in best]
        np.testing.assert_allclose([p.score for p in sent], [p.score for p in best], atol=1e-6)
        assert there.width == here.width and there.height == here.height


async def test_only_what_was_asked_for_crosses_back(micro_repository: Path, tmp_path: Path) -> None:
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with engine_server(settings, path), front_end(settings, path) as split:
        labels = split.card.labels if split.card else []
        ranked = await _predict(split, 1, Want(top_k=3))
        embedded = await _predict(split, 1, Want(embedding=True))
        full = await _predict(split, 1, FULL)
    assert ranked.result.logits.size == 0 and ranked.result.embedding.size == 0
    assert len(ranked.result.outputs.top_k(0, labels, 3)) == 3
    with pytest.raises(ValueError, match="asked for top 4"):
        ranked.result.outputs.top_k(0, labels, 4)
    assert embedded.result.logits.size == 0
    np.testing.assert_array_equal(embedded.result.embedding, full.result.embedding)
    probabilities = softmax(full.result.logits)
    scores = [p.score for p in ranked.result.outputs.top_k(0, labels, 3)]
    np.testing.assert_allclose(scores, np.sort(probabilities)[::-1][:3], atol=1e-6)


class Gate:
    """Hold every batch at the model until opened; count the batches that reached it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = asyncio.Event()
        self.batches: list[int] = []
        real = RuntimePool.infer

        async def gated(pool: RuntimePool, items: Any) -> Any:
            self.batches.append(len(items))
            await self.open.wait()
            return await real(pool, items)

        monkeypatch.setattr(RuntimePool, "infer", gated)


async def test_a_caller_that_leaves_drops_its_input_in_the_engine_before_the_model(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with engine_server(settings, path) as server, front_end(settings, path) as split:
        engine = split.engine
        assert isinstance(engine, ProcessEngine)
        first = asyncio.create_task(_predict(split, 1))
        await wait_until(lambda: len(gate.batches) == 1)  # in the model, held at the gate
        second = asyncio.create_task(_predict(split, 2))
        assert server.engine.batcher is not None
        await wait_until(lambda: server.engine.batcher.queue_depth == 1)  # queued in the engine
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        dropped = server.metrics.registry.get_sample_value(
            "hiera_dropped_total", {"reason": "cancelled"}
        )
        await wait_until(
            lambda: (
                server.metrics.registry.get_sample_value(
                    "hiera_dropped_total", {"reason": "cancelled"}
                )
                == 1
            )
        )
        assert dropped in (None, 0.0, 1.0)
        gate.open.set()
        outcome = await first
        assert outcome.result.batch_size == 1
        # The cancelled input never reached the model, and its slot is free again.
        assert gate.batches == [1]
        pools = engine._conn.pools if engine._conn else {}
        await wait_until(lambda: all(p.free == p.slots.count for p in pools.values()))
        assert split.admission is not None and split.admission.outstanding == 0


async def test_the_engine_enforces_the_callers_deadline(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)  # held shut: nothing finishes in time
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with engine_server(settings, path), front_end(settings, path) as split:
        ticket = split.admit(1)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await split.predict(make_image(1), "classify", started + 0.3, ticket=ticket)
        assert time.monotonic() - started < 1.0  # the engine's answer, not the guard's
        gate.open.set()


async def test_an_engine_that_goes_away_fails_waiting_requests_at_once_then_comes_back(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with front_end_after(settings, path) as (split, start_engine):
        server, stop = await start_engine()
        await wait_until(lambda: split.ready, within_s=30)
        waiting = asyncio.create_task(_predict(split, 1))
        await wait_until(lambda: len(gate.batches) == 1)
        started = time.monotonic()
        for link in list(server.links.values()):  # the corridor closes, as when it dies
            assert link is not None
            assert link.transport is not None
            link.transport.abort()
        with pytest.raises(EngineUnavailable):
            await waiting
        assert time.monotonic() - started < 1.0
        await wait_until(lambda: not split.ready)
        gate.open.set()
        await stop()
        server, stop = await start_engine()  # a new engine on the same socket: it is reached
        await wait_until(lambda: split.ready, within_s=30)
        outcome = await _predict(split, 2)
        assert outcome.result.embedding.shape == (128,)
        await stop()


@contextlib.asynccontextmanager
async def front_end_after(
    settings: Settings, path: Path
) -> AsyncIterator[
    tuple[InferenceService, Callable[[], Awaitable[tuple[EngineServer, Callable[[], Any]]]]]
]:
    """Yield a front end (loading in the background) and a way to start engines for it."""
    front = settings.model_copy(update={"engine": "process", "engine_socket": path})
    service = InferenceService(front, Metrics())
    loading = asyncio.create_task(service.load())

    async def start() -> tuple[EngineServer, Callable[[], Any]]:
        server = EngineServer(settings, str(path), metrics=Metrics())
        task = asyncio.create_task(server.run(signals=False))
        await wait_until(lambda: bool(server.links) or task.done(), within_s=60)

        async def stop() -> None:
            server.stop()
            await asyncio.wait_for(task, 30)

        return server, stop

    try:
        yield service, start
    finally:
        loading.cancel()
        await service.close()


async def test_front_ends_share_the_engines_capacity(
    micro_repository: Path, tmp_path: Path
) -> None:
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with (
        engine_server(settings, path) as server,
        front_end(settings, path) as one,
        front_end(settings, path) as two,
    ):
        capacity = server.engine.capacity
        assert one.admission is not None and two.admission is not None
        assert one.admission.capacity == two.admission.capacity == capacity
        most = one.admit(capacity - 1)
        last = two.admit(1)
        for service in (one, two):
            refused = service.refusal()
            assert refused is not None and "capacity" in str(refused)
            with pytest.raises(Exception, match="capacity"):
                service.admit(1)
        last.release()
        assert two.admit(1).left == 1  # the room one front end gave back, the other may take
        most.release_all()
        assert one.admission.outstanding == 1


async def test_uploads_are_decoded_into_their_slot_which_a_leaving_caller_frees_only_after(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The crop is written by the decoder straight into shared memory: the slot the SUBMIT
    # names holds exactly the crop the CPU path makes. A caller that leaves while its image is
    # still decoding must not free the slot the decode thread is writing.
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    started, release = threading.Event(), threading.Event()
    written: list[np.ndarray] = []
    real_decode = InferenceService._decode

    def slow_decode(self: InferenceService, data: bytes, pp: Any, out: Any = None) -> Any:
        started.set()
        release.wait(10)
        prepared = real_decode(self, data, pp, out)
        written.append(prepared.pixels)
        return prepared

    async with engine_server(settings, path), front_end(settings, path) as split:
        engine = split.engine
        assert isinstance(engine, ProcessEngine) and engine._conn is not None
        crops = engine._conn.pools[wire.CROPS]
        monkeypatch.setattr(InferenceService, "_decode", slow_decode)
        leaving = asyncio.create_task(_predict(split, 3))
        await asyncio.to_thread(started.wait, 10)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert crops.free == crops.slots.count - 1  # still the decode thread's
        release.set()
        await wait_until(lambda: crops.free == crops.slots.count)
        assert written and np.shares_memory(written[0], crops.slots.inputs)
        assert split.card is not None
        image = imaging.decode_image(make_image(3), max_pixels=10**8).image
        np.testing.assert_array_equal(written[0], imaging.crop(image, split.card.preprocessing))
        outcome = await _predict(split, 3)  # the slot serves the next upload as usual
    assert outcome.result.batch_size == 1
