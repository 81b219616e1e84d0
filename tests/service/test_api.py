"""The HTTP API through the ASGI transport, against a real micro Hiera on ONNX Runtime."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from model.hiera import BuiltModel
from service.app import create_app
from tests.service.helpers import make_image, repository_settings, running, sample
from tests.service.reference import probabilities, reference, top_indices, unit


async def test_classify_matches_eager_reference(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    app = create_app(repository_settings(micro_repository))
    data = make_image(1)
    async with running(app) as client:
        response = await client.post(
            "/v1/classify?top_k=5", content=data, headers={"Content-Type": "image/jpeg"}
        )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "hiera_micro"
    logits, _ = reference(micro_model, data)
    scores = probabilities(logits)
    assert [entry["index"] for entry in body["labels"]] == top_indices(logits, 5)
    labels = app.state.service.card.labels
    for entry in body["labels"]:
        assert entry["label"] == labels[entry["index"]]
        assert entry["score"] == pytest.approx(scores[entry["index"]], rel=1e-4)
    assert set(body["timing"]) == {
        "decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "postprocess_ms", "batch_size"
    }  # fmt: skip
    assert response.headers["x-request-id"]


async def test_embed_matches_eager_reference(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    data = make_image(2, fmt="PNG")
    _, want = reference(micro_model, data)
    async with running(create_app(repository_settings(micro_repository))) as client:
        raw = await client.post(
            "/v1/embed?normalize=false", content=data, headers={"Content-Type": "image/png"}
        )
        unit_length = await client.post("/v1/embed", files={"image": ("x.png", data, "image/png")})
        packed = await client.post(
            "/v1/embed?encoding=base64", content=data, headers={"Content-Type": "image/png"}
        )
    assert raw.status_code == unit_length.status_code == packed.status_code == 200
    raw_body, unit_body = raw.json(), unit_length.json()
    assert raw_body["dim"] == 128 and raw_body["normalized"] is False
    np.testing.assert_allclose(raw_body["embedding"], want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(unit_body["embedding"], unit(want), rtol=0, atol=1e-5)
    assert unit_body["normalized"] is True
    decoded = np.frombuffer(base64.b64decode(packed.json()["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, unit_body["embedding"], rtol=0, atol=1e-7)
    assert packed.json()["encoding"] == "base64"


async def test_concurrent_requests_batch_and_answer_their_own_caller(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    app = create_app(repository_settings(micro_repository, max_delay_ms=100.0))
    images = [make_image(seed) for seed in range(8)]
    async with running(app) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/embed?normalize=false", content=data,
                            headers={"Content-Type": "image/jpeg"})
                for data in images
            )
        )  # fmt: skip
    assert [r.status_code for r in responses] == [200] * 8
    for data, response in zip(images, responses, strict=True):
        _, want = reference(micro_model, data)
        np.testing.assert_allclose(response.json()["embedding"], want, rtol=0, atol=1e-4)
    sizes = [r.json()["timing"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    assert sample(app, "hiera_batch_size_count") < 8  # fewer batches than requests
    assert sample(app, "hiera_batch_size_sum") == 8


UNRECOGNIZED = "the data is not a recognized image; send one of: BMP, GIF, JPEG, MPO, PNG, WEBP"


async def test_batch_endpoint_isolates_a_bad_image(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    good = [make_image(10), make_image(11, fmt="PNG")]
    files = [
        ("images", ("a.jpg", good[0], "image/jpeg")),
        ("images", ("b.txt", b"this is not an image", "image/jpeg")),
        ("images", ("c.png", good[1], "image/png")),
    ]
    async with running(create_app(repository_settings(micro_repository))) as client:
        response = await client.post("/v1/embed/batch?normalize=false", files=files)
        classified = await client.post("/v1/classify/batch?top_k=2", files=files)
    assert response.status_code == classified.status_code == 200
    # A failed item carries only its index and the native error body (docs/api/native.md); a
    # good one only its index and the single-image answer.
    failed = {"code": "unsupported_format", "message": UNRECOGNIZED}
    for answer in (response, classified):
        results = answer.json()["results"]
        keys = [set(r) for r in results]
        assert keys == [{"index", "result"}, {"index", "error"}, {"index", "result"}]
        assert [r["index"] for r in results] == [0, 1, 2]
        assert results[1] == {
            "index": 1,
            "error": failed | {"request_id": answer.headers["x-request-id"]},
        }
    results = response.json()["results"]
    for item, data in ((results[0], good[0]), (results[2], good[1])):
        _, want = reference(micro_model, data)
        np.testing.assert_allclose(item["result"]["embedding"], want, rtol=0, atol=1e-4)
    classes = classified.json()["results"]
    for item, data in ((classes[0], good[0]), (classes[2], good[1])):
        logits, _ = reference(micro_model, data)
        assert [e["index"] for e in item["result"]["labels"]] == top_indices(logits, 2)


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/v1/classify", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400,
         "empty_image"),
        ("/v1/classify", {"content": b"\xff\xd8\xff\xe0garbage", "headers":
                          {"Content-Type": "image/jpeg"}}, 400, "corrupt_image"),
        ("/v1/classify", {"content": b"GIF", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("/v1/classify", {"content": b"random bytes", "headers": {"Content-Type": "image/png"}},
         415, "unsupported_format"),
        ("/v1/classify?top_k=0", {"content": b"x", "headers": {"Content-Type": "image/png"}}, 422,
         "invalid_request"),
        ("/v1/classify?top_k=101", {"content": b"x", "headers": {"Content-Type": "image/png"}},
         422, "invalid_request"),
        ("/v1/embed?encoding=hex", {"content": b"x", "headers": {"Content-Type": "image/png"}},
         422, "invalid_request"),
        ("/v1/embed", {"files": {"picture": ("a.jpg", b"x", "image/jpeg")}}, 400,
         "missing_image"),
        ("/v1/embed", {"files": [("image", ("a.jpg", b"x", "image/jpeg")),
                                 ("image", ("b.jpg", b"y", "image/jpeg"))]}, 400,
         "too_many_images"),
        ("/v1/embed/batch", {"content": b"x", "headers": {"Content-Type": "image/png"}}, 415,
         "unsupported_media_type"),
        ("/v1/nowhere", {"content": b"x"}, 404, "not_found"),
    ],
)  # fmt: skip
async def test_bad_requests_get_exact_json_errors(
    micro_repository: Path, path: str, kwargs: dict[str, object], status: int, code: str
) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        response = await client.post(path, **kwargs)  # type: ignore[arg-type]
        # The server is unharmed: a good request right after still succeeds.
        after = await client.post(
            "/v1/classify", content=make_image(3), headers={"Content-Type": "image/jpeg"}
        )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert after.status_code == 200


async def test_size_limits(micro_repository: Path) -> None:
    settings = repository_settings(
        micro_repository, max_body_bytes=4096, max_image_pixels=10_000, max_images_per_request=2
    )
    app = create_app(settings)
    big = make_image(4, size=(1000, 800), fmt="PNG")
    assert len(big) > 4096
    async with running(app) as client:
        body = await client.post("/v1/classify", content=big, headers={"Content-Type": "image/png"})
        pixels = await client.post(
            "/v1/classify", content=make_image(5, size=(200, 100)),
            headers={"Content-Type": "image/jpeg"},
        )  # fmt: skip
        many = await client.post(
            "/v1/classify/batch",
            files=[("images", (f"{i}.jpg", make_image(i, size=(16, 16)), "image/jpeg"))
                   for i in range(3)],
        )  # fmt: skip
    assert (body.status_code, body.json()["error"]["code"]) == (413, "body_too_large")
    # Counted under the endpoint it was sent to, once, by its error code.
    assert sample(app, "hiera_requests_total", endpoint="classify", status="413") == 2
    assert sample(app, "hiera_failures_total", reason="body_too_large") == 1
    assert (pixels.status_code, pixels.json()["error"]["code"]) == (413, "image_too_large")
    assert (many.status_code, many.json()["error"]["code"]) == (413, "too_many_images")


async def test_models_and_health(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, instances_per_device=2))
    async with running(app) as client:
        models = (await client.get("/v1/models")).json()["models"][0]
        live = await client.get("/health/live")
        ready = await client.get("/health/ready")
    assert live.status_code == 200 and ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert models["name"] == "hiera_micro" and models["backend"] == "onnx"
    assert models["weights"]["random"] is True and models["weights"]["kind"] == "random"
    assert models["embed_dim"] == 128 and models["num_classes"] == 1000
    assert models["input_size"] == [224, 224]
    assert models["devices"] == ["cpu", "cpu"]
    assert models["batching"]["max_batch_size"] == 4 and models["batching"]["instances"] == 2


async def test_adaptive_layout_answers_a_lone_request_on_every_core(
    micro_repository: Path, micro_model: BuiltModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    # The default layout (one instance, runtime-default threads) is what the adaptive one
    # replaces; the test helper's intra_op_threads=1 would keep it off.
    app = create_app(repository_settings(micro_repository, intra_op_threads=0))
    data = make_image(3)
    async with running(app) as client:
        models = (await client.get("/v1/models")).json()["models"][0]
        response = await client.post(
            "/v1/embed", content=data, headers={"Content-Type": "image/jpeg"}
        )
        pool = app.state.service.pool
        runs = [i.batches for i in pool.all_instances]
    assert models["devices"] == ["cpu"] * 3
    batching = models["batching"]
    assert batching["instances"] == 3 and batching["concurrent_batches"] == 2
    assert batching["solo_instance"] is True
    # Admission counts the batches that run at once, not the solo instance beside them.
    assert batching["capacity"] == batching["max_queue_size"] + 2 * batching["batch_cap"]
    assert runs == [0, 0, 1]
    _, embedding = reference(micro_model, data)
    np.testing.assert_allclose(response.json()["embedding"], unit(embedding), atol=1e-5)


async def test_metrics_move_by_the_right_amounts(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        for seed in range(3):
            await client.post("/v1/classify", content=make_image(seed),
                              headers={"Content-Type": "image/jpeg"})  # fmt: skip
        await client.post("/v1/classify", content=b"nope", headers={"Content-Type": "image/png"})
        text = (await client.get("/metrics")).text
        assert sample(app, "hiera_ready") == 1
    assert sample(app, "hiera_ready") == 0  # shut down: no longer ready
    ok = {"endpoint": "classify", "status": "200"}
    assert sample(app, "hiera_requests_total", **ok) == 3
    assert sample(app, "hiera_requests_total", endpoint="classify", status="415") == 1
    assert sample(app, "hiera_failures_total", reason="unsupported_format") == 1
    for stage in ("decode", "preprocess", "queue", "inference", "postprocess"):
        count = sample(app, "hiera_stage_duration_seconds_count", endpoint="classify", stage=stage)
        assert count == 3, stage
    assert sample(app, "hiera_request_duration_seconds_count", endpoint="classify") == 4
    assert sample(app, "hiera_image_bytes_count") == 4  # the bad one was still received
    assert sample(app, "hiera_image_pixels_count") == 3
    assert sample(app, "hiera_model_load_duration_seconds") > 0
    assert 'hiera_requests_total{endpoint="classify",status="200"} 3.0' in text
    assert "hiera_queue_depth" in text and "hiera_requests_in_flight" in text


async def test_openapi_documents_image_bodies(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        spec = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    single = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert single["image/jpeg"]["schema"] == {"type": "string", "format": "binary"}
    assert single["multipart/form-data"]["schema"]["required"] == ["image"]
    batch = spec["paths"]["/v1/embed/batch"]["post"]["requestBody"]["content"]
    images = batch["multipart/form-data"]["schema"]["properties"]["images"]
    assert images["type"] == "array" and images["items"]["format"] == "binary"
    responses = spec["paths"]["/v1/classify"]["post"]["responses"]
    assert {"200", "413", "415", "429", "503", "504"} <= set(responses)
    assert sample(app, "hiera_requests_total", endpoint="openapi", status="200") == 1


async def test_chunked_body_over_the_limit_is_refused(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, max_body_bytes=4096))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\xff" * 1024

    async with running(app) as client:
        response = await client.post(
            "/v1/classify", content=chunks(), headers={"Content-Type": "image/jpeg"}
        )
    assert "content-length" not in response.request.headers
    assert (response.status_code, response.json()["error"]["code"]) == (413, "body_too_large")


@pytest.mark.parametrize("backend", ["onnx", "torchscript", "eager"])
async def test_every_backend_serves_the_same_embeddings(
    micro_repository: Path, micro_model: BuiltModel, backend: str
) -> None:
    data = make_image(21)
    _, want = reference(micro_model, data)
    app = create_app(repository_settings(micro_repository, backend=backend))
    async with running(app) as client:
        response = await client.post(
            "/v1/embed?normalize=false", content=data, headers={"Content-Type": "image/jpeg"}
        )
        models = (await client.get("/v1/models")).json()["models"][0]
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["embedding"], want, rtol=0, atol=1e-4)
    assert models["backend"] == backend
