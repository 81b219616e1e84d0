"""JPEG bytes through the corridor, decoded by the engine (its tensor decoder on CPU tensors).

A real EngineServer decodes with the TensorDecoder on "cpu" (what --decode-device cuda runs on a
GPU); a front end reaches it over a real socket and shared memory. Its answers are compared with
the inline layout's, decoding with the same tensor decoder, or with Pillow where the front end
still decodes (other formats, JPEGs too large for a slot).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import imaging
from service.batching import DeadlineExceeded
from service.engine import wire
from service.engine.client import ProcessEngine
from service.engine.process import EngineServer
from service.imaging.device import DecodedBatch, TensorDecoder
from service.imaging.errors import CorruptImage
from service.inference import InferenceService, Outcome
from service.metrics import Metrics
from service.settings import Settings
from tests.service.engine.test_client import FULL, Gate, _settings, engine_server, front_end
from tests.service.helpers import make_image, wait_until


def _damaged_jpeg() -> bytes:
    """Return a JPEG whose header passes the front end's checks but whose Huffman table is junk."""
    good = make_image(1)
    table = good.index(b"\xff\xc4")  # DHT
    return good[: table + 4] + b"\xff" * 20 + good[table + 24 :]


async def _predict(service: InferenceService, data: bytes) -> Outcome:
    ticket = service.admit(1)
    return await service.predict(data, "classify", time.monotonic() + 30, ticket=ticket, want=FULL)


async def _answers(service: InferenceService, uploads: Sequence[bytes]) -> list[Outcome]:
    return list(await asyncio.gather(*(_predict(service, data) for data in uploads)))


async def _inline(settings: Settings, uploads: Sequence[bytes], decode_on: str | None) -> Any:
    service = InferenceService(settings, Metrics(), decode_on=decode_on)
    await service.load()
    try:
        return [await _predict(service, data) for data in uploads]
    finally:
        await service.close()


def _same(there: Sequence[Outcome], here: Sequence[Outcome]) -> None:
    for a, b in zip(there, here, strict=True):
        np.testing.assert_allclose(a.result.logits, b.result.logits, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.result.embedding, b.result.embedding, rtol=0, atol=1e-5)
        assert (a.width, a.height) == (b.width, b.height)


def _engine_decoded(server: EngineServer) -> int:
    assert server.decoder is not None
    return server.decoder.batches


class DecodeGate:
    """Hold the engine's decode thread until opened; record each batch's size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.started = threading.Event()
        self.sizes: list[int] = []
        real = TensorDecoder.decode_batch

        def gated(decoder: TensorDecoder, uploads: Sequence[bytes]) -> DecodedBatch:
            self.sizes.append(len(uploads))
            self.started.set()
            self.open.wait(10)
            return real(decoder, uploads)

        monkeypatch.setattr(TensorDecoder, "decode_batch", gated)


async def test_jpegs_decoded_by_the_engine_answer_as_the_inline_device_decoder_does(
    micro_repository: Path, tmp_path: Path
) -> None:
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    uploads = [make_image(seed) for seed in range(5)]
    async with (
        engine_server(settings, path, decode_on="cpu") as server,
        front_end(settings, path) as split,
    ):
        engine = split.engine
        assert isinstance(engine, ProcessEngine) and engine.jpeg_device == "cpu"
        assert split.decode_device == "cpu" and split.device_decoder == "torchvision"
        remote = await _answers(split, uploads)
        assert _engine_decoded(server) >= 1  # the JPEGs crossed undecoded
        registry = split.metrics.registry
        for stage, seconds in (
            ("decode", [o.decode_seconds for o in remote]),
            ("preprocess", [o.preprocess_seconds for o in remote]),
        ):
            labels = {"endpoint": "classify", "stage": stage}
            count = registry.get_sample_value("hiera_stage_duration_seconds_count", labels)
            total = registry.get_sample_value("hiera_stage_duration_seconds_sum", labels)
            assert count == len(uploads)
            assert total == pytest.approx(sum(seconds), abs=1e-5) and total > 0
        jpegs = engine._conn.pools[wire.JPEGS] if engine._conn else None
        assert jpegs is not None and jpegs.free == jpegs.slots.count
    local = await _inline(settings, uploads, decode_on="cpu")
    _same(remote, local)


async def test_a_damaged_jpeg_gets_the_cpu_paths_error_and_its_batch_mates_their_answers(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    damaged = _damaged_jpeg()
    with pytest.raises(CorruptImage) as cpu:
        imaging.decode_image(damaged, max_pixels=10**8)
    gate = DecodeGate(monkeypatch)
    settings = _settings(micro_repository)  # batches of 2, decoded and run
    path = tmp_path / "engine.sock"
    good = make_image(2)
    async with (
        engine_server(settings, path, decode_on="cpu") as server,
        front_end(settings, path) as split,
    ):
        first = asyncio.create_task(_predict(split, make_image(4)))
        await asyncio.to_thread(gate.started.wait, 10)  # the decode thread holds this one
        mates = [asyncio.create_task(_predict(split, data)) for data in (good, damaged)]
        assert server.decoder is not None
        await wait_until(lambda: len(server.decoder._waiting) == 2)  # queued for one batch
        gate.open.set()
        await first
        results = await asyncio.gather(*mates, return_exceptions=True)
    assert gate.sizes == [1, 2]  # the damaged JPEG was decoded in one batch with the good one
    answered, refused = results
    assert type(refused) is CorruptImage and str(refused) == str(cpu.value)
    assert isinstance(answered, Outcome)
    _same([answered], await _inline(settings, [good], decode_on="cpu"))


async def test_other_formats_and_jpegs_too_large_for_a_slot_decode_in_the_front_end(
    micro_repository: Path, tmp_path: Path
) -> None:
    small, large = make_image(5), make_image(6, (1200, 900))
    png = make_image(7, fmt="PNG")
    settings = _settings(micro_repository, jpeg_slot_bytes=len(small))
    path = tmp_path / "engine.sock"
    async with (
        engine_server(settings, path, decode_on="cpu") as server,
        front_end(settings, path) as split,
    ):
        cpu_decoded = await _answers(split, [large, png])
        assert _engine_decoded(server) == 0
        engine_decoded = await _answers(split, [small])
        assert _engine_decoded(server) == 1
    _same(cpu_decoded, await _inline(settings, [large, png], decode_on=None))  # Pillow's crops
    _same(engine_decoded, await _inline(settings, [small], decode_on="cpu"))


async def test_a_caller_that_leaves_while_the_engine_decodes_never_reaches_the_model(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding = DecodeGate(monkeypatch)
    model = Gate(monkeypatch)
    model.open.set()  # only counts the batches
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with (
        engine_server(settings, path, decode_on="cpu") as server,
        front_end(settings, path) as split,
    ):
        engine = split.engine
        assert isinstance(engine, ProcessEngine) and engine._conn is not None
        leaving = asyncio.create_task(_predict(split, make_image(8)))
        await asyncio.to_thread(decoding.started.wait, 10)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving

        def dropped() -> float | None:
            labels = {"reason": "cancelled"}
            return server.metrics.registry.get_sample_value("hiera_dropped_total", labels)

        await wait_until(lambda: dropped() == 1)  # the engine heard the CANCEL while decoding
        decoding.open.set()
        jpegs = engine._conn.pools[wire.JPEGS]
        await wait_until(lambda: jpegs.free == jpegs.slots.count)
        assert model.batches == []
        assert split.admission is not None and split.admission.outstanding == 0
        outcome = await _predict(split, make_image(9))  # the corridor serves the next as usual
    assert outcome.result.batch_size == 1 and model.batches == [1]


async def test_a_draining_engine_finishes_the_jpegs_it_is_decoding(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding = DecodeGate(monkeypatch)
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with (
        engine_server(settings, path, decode_on="cpu") as server,
        front_end(settings, path) as split,
    ):
        accepted = asyncio.create_task(_predict(split, make_image(10)))
        await asyncio.to_thread(decoding.started.wait, 10)
        server.stop()  # SIGTERM while the JPEG decodes
        await wait_until(lambda: server.board.state != "ready")  # it is shutting down
        decoding.open.set()
        outcome = await accepted
    assert outcome.result.batch_size == 1 and outcome.result.embedding.shape == (128,)


async def test_the_engine_enforces_the_deadline_while_a_jpeg_decodes(
    micro_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoding = DecodeGate(monkeypatch)  # held shut: the decode never finishes in time
    model = Gate(monkeypatch)
    model.open.set()
    settings = _settings(micro_repository)
    path = tmp_path / "engine.sock"
    async with (
        engine_server(settings, path, decode_on="cpu") as server,
        front_end(settings, path) as split,
    ):
        ticket = split.admit(1)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await split.predict(make_image(11), "classify", started + 0.3, ticket=ticket)
        assert time.monotonic() - started < 1.0  # the engine's answer, not the guard's
        labels = {"reason": "deadline"}
        assert server.metrics.registry.get_sample_value("hiera_dropped_total", labels) == 1
        decoding.open.set()
    assert model.batches == []
