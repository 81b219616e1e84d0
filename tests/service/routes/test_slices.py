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
from tests.service.helpers import (
    live_server,
    make_image,
    repository_settings,
    running,
    sample,
    wait_until,
)
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


@pytest.mark.slow
def test_langchain_and_llamaindex_default_batch_sizes_against_a_real_server(
    micro_repository: Path, micro_model: BuiltModel, tmp_path: Path
) -> None:
    import httpx
    from langchain_openai import OpenAIEmbeddings
    from llama_index.embeddings.openai import OpenAIEmbedding

    def received(url: str) -> float:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        line = next(
            (x for x in text.splitlines()
             if x.startswith('hiera_requests_received_total{endpoint="openai_embeddings"}')),
            "_ 0",
        )  # fmt: skip
        return float(line.split()[-1])

    wants = [unit(reference(micro_model, d)[1]) for d in IMAGES]
    with live_server(micro_repository, tmp_path / "server.log") as url:
        # LangChain sends chunk_size (1000) inputs per request: 1001 documents, 2 requests.
        langchain = OpenAIEmbeddings(
            model="hiera_micro", base_url=f"{url}/v1", api_key="unused",  # type: ignore[arg-type]
            check_embedding_ctx_length=False, max_retries=0,
        )  # fmt: skip
        assert langchain.chunk_size == 1000
        documents = [_uri(IMAGES[i % len(IMAGES)]) for i in range(1001)]
        before = received(url)
        vectors = langchain.embed_documents(documents)
        assert received(url) - before == 2
        assert len(vectors) == 1001
        for i in (0, 1, 999, 1000):
            np.testing.assert_allclose(vectors[i], wants[i % len(IMAGES)], rtol=0, atol=1e-5)
        # LlamaIndex sends embed_batch_size (100) per request: 250 texts, 3 requests.
        llama = OpenAIEmbedding(
            model_name="hiera_micro", api_base=f"{url}/v1", api_key="unused", max_retries=0
        )
        assert llama.embed_batch_size == 100
        before = received(url)
        got = llama.get_text_embedding_batch(documents[:250])
        assert received(url) - before == 3
        assert len(got) == 250
        for i in (0, 99, 100, 249):
            np.testing.assert_allclose(got[i], wants[i % len(IMAGES)], rtol=0, atol=1e-5)
