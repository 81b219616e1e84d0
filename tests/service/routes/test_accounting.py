"""Which requests count as received: those an inference route was entered for, and only those."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from service.app import create_app
from tests.service.helpers import make_image, repository_settings, running, sample

JPEG = {"Content-Type": "image/jpeg"}


def _received(app: FastAPI, endpoint: str) -> float:
    return sample(app, "hiera_requests_received_total", endpoint=endpoint)


def _outcome(app: FastAPI, endpoint: str, outcome: str) -> float:
    return sample(app, "hiera_request_outcomes_total", endpoint=endpoint, outcome=outcome)


async def test_requests_refused_before_the_handler_runs_are_still_received(
    micro_repository: Path,
) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        bad_query = await client.post("/v1/classify?top_k=0", content=make_image(0), headers=JPEG)
        bad_type = await client.post(
            "/v1/embed", content=b"x", headers={"Content-Type": "text/plain"}
        )
        bad_json = await client.post("/v2/models/hiera_micro/infer", content=b"{")
        wrong_model = await client.post("/v2/models/resnet/infer", content=b"{}")
        no_model = await client.post("/v1/embeddings", json={"input": "aGk="})
        fine = await client.post("/v1/classify/batch", files=[("images", make_image(1))])
    answers = (bad_query, bad_type, bad_json, wrong_model, no_model, fine)
    assert [r.status_code for r in answers] == [422, 415, 400, 404, 400, 200]
    assert _received(app, "classify") == _outcome(app, "classify", "invalid") == 1
    assert _received(app, "embed") == _outcome(app, "embed", "invalid") == 1
    assert _received(app, "kserve_infer") == _outcome(app, "kserve_infer", "invalid") == 2
    assert _received(app, "openai_embeddings") == 1
    assert _outcome(app, "openai_embeddings", "invalid") == 1
    assert _received(app, "classify_batch") == _outcome(app, "classify_batch", "ok") == 1


async def test_probes_metadata_and_unrouted_requests_are_not_inference(
    micro_repository: Path,
) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        answers = [
            await client.get("/health/ready"),
            await client.get("/health/live"),
            await client.get("/v2/health/ready"),
            await client.get("/v2/models/hiera_micro"),
            await client.get("/v1/models"),
            await client.get("/metrics"),
            await client.get("/v1/classify"),  # 405: the route is never entered
            await client.post("/v1/nowhere", content=b""),
        ]
        scrape = (await client.get("/metrics")).text
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 200, 405, 404]
    assert "hiera_requests_received_total{" not in scrape
    assert "hiera_request_outcomes_total{" not in scrape
    assert sample(app, "hiera_requests_total", endpoint="classify", status="405") == 1
