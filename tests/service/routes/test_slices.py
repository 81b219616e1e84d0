"""Large /v1/embeddings requests are fed to the model in slices, in process: they hold at
most a window of the capacity, wait for room instead of failing, and starve nobody."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.hiera import BuiltModel
from service.app import create_app
from tests.service.helpers import make_image, repository_settings, running, sample, wait_until
from tests.service.reference import reference, unit

# Small images: decoding costs little, so the batcher and admission are what is tested.
IMAGES = [make_image(seed, size=(40, 30)) for seed in range(6)]
JPEG = {"Content-Type": "image/jpeg"}


def _uri(data: bytes) -> str:
    return f"data:image/jpeg;base64,{base64.b64encode(data).decode()}"


def _recording(app: Any) -> list[int]:
    """Record every admitted-images count the admission reports (the gauge's values)."""
    seen: list[int] = []
    admission = app.state.service.admission
    report = admission._on_change

    def both(outstanding: int) -> None:
        seen.append(outstanding)
        report(outstanding)

    admission._on_change = both
    return seen


async def test_a_large_request_holds_at_most_a_window_and_answers_in_order(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    count = 150  # over max_images_per_request: only /v1/embeddings takes this many
    app = create_app(repository_settings(micro_repository, max_images_per_request=64))
    async with running(app) as http:
        seen = _recording(app)
        inputs = [_uri(IMAGES[i % len(IMAGES)]) for i in range(count)]
        answer = await http.post("/v1/embeddings", json={"model": "m", "input": inputs})
        depth = sample(app, "hiera_admitted_images")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [item["index"] for item in data] == list(range(count))
    wants = [unit(reference(micro_model, d)[1]) for d in IMAGES]
    for i, item in enumerate(data):
        np.testing.assert_allclose(item["embedding"], wants[i % len(IMAGES)], rtol=0, atol=1e-5)
    window = 2 * app.state.service.batch_cap  # 8: max_batch_size 4, no warm-up cap
    assert max(seen) == window and depth == 0


async def test_a_large_request_waits_for_room_instead_of_failing(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    # Capacity 1 queued + 4 running = 5 images, less than one window of 8.
    app = create_app(repository_settings(micro_repository, max_queue_size=1))
    async with running(app) as http:
        seen = _recording(app)
        inputs = [_uri(IMAGES[i % len(IMAGES)]) for i in range(40)]
        answer = await http.post("/v1/embeddings", json={"model": "m", "input": inputs})
        capacity = app.state.service.admission.capacity
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 40
    assert capacity == 5 and max(seen) == 5  # it filled the room there was, and waited


async def test_single_images_are_not_starved_by_a_large_request(
    micro_repository: Path,
) -> None:
    # Room for the whole large request: it could be admitted whole, and must not be.
    app = create_app(repository_settings(micro_repository, max_queue_size=1000))
    async with running(app) as http:
        inputs = [_uri(IMAGES[i % len(IMAGES)]) for i in range(400)]
        large = asyncio.create_task(
            http.post("/v1/embeddings", json={"model": "m", "input": inputs})
        )
        await wait_until(
            lambda: sample(app, "hiera_stage_duration_seconds_count",
                           endpoint="openai_embeddings", stage="inference") > 0
        )  # fmt: skip
        singles = []
        for seed in range(5):
            single = await http.post("/v1/embed", content=IMAGES[seed], headers=JPEG)
            singles.append(single.status_code)
            # Each is answered while the large request still has images to go.
            assert not large.done(), f"single {seed} waited for the whole large request"
        answer = await large
    assert singles == [200] * 5 and answer.status_code == 200
    assert len(answer.json()["data"]) == 400


@pytest.mark.parametrize("count", [2048, 2049])
async def test_the_input_limit_is_openais(micro_repository: Path, count: int) -> None:
    async with running(create_app(repository_settings(micro_repository))) as http:
        if count > 2048:
            answer = await http.post(
                "/v1/embeddings", json={"model": "m", "input": [_uri(IMAGES[0])] * count}
            )
            assert answer.status_code == 413
            assert answer.json()["error"]["code"] == "too_many_images"
            return
        answer = await http.post(
            "/v1/embeddings", json={"model": "m", "input": [_uri(IMAGES[0])] * count}
        )
    assert answer.status_code == 200 and len(answer.json()["data"]) == count
