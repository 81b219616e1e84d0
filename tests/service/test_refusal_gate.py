"""At capacity, inference requests are refused at the door: before routing or reading a body."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from service.app import create_app
from tests.service.helpers import make_image, repository_settings, running, sample

JPEG = {"Content-Type": "image/jpeg"}


def _counts(app: FastAPI, endpoint: str) -> tuple[float, float, float]:
    received = sample(app, "hiera_requests_received_total", endpoint=endpoint)
    rejected = sample(app, "hiera_request_outcomes_total", endpoint=endpoint, outcome="rejected")
    return received, rejected, sample(app, "hiera_failures_total", reason="queue_full")


async def test_a_full_service_refuses_before_reading_the_request(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        service = app.state.service
        capacity = service.admission.capacity
        ticket = service.admit(capacity)  # every slot taken, as by requests in flight
        before = _counts(app, "classify")
        # Not even a valid request: the route would answer 415, the gate never looks.
        refused = await client.post(
            "/v1/classify",
            content=b"x",
            headers={"Content-Type": "text/plain", "X-Request-ID": "r1"},
        )
        batch = await client.post("/v1/embed/batch", content=b"not multipart", headers=JPEG)
        models = await client.get("/v1/models")  # metadata is not inference: never gated
        after = _counts(app, "classify")
        assert service.admission.outstanding == capacity  # the gate admitted nothing
        ticket.release_all()
        served = await client.post("/v1/classify", content=make_image(1), headers=JPEG)
    assert refused.status_code == 429 and batch.status_code == 429
    assert refused.headers["Retry-After"] == "1" and refused.headers["X-Request-ID"] == "r1"
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and "at capacity" in error["message"]
    assert error["request_id"] == "r1"
    assert after[0] - before[0] == after[1] - before[1] == 1  # received once, rejected once
    assert after[2] - before[2] == 2  # both refusals, under their error code
    assert models.status_code == 200 and served.status_code == 200


async def test_protocol_routes_are_refused_in_their_own_shape(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        service = app.state.service
        ticket = service.admit(service.admission.capacity)
        kserve = await client.post("/v2/models/hiera_micro/infer", content=b"{")
        openai = await client.post("/v1/embeddings", json={"input": "aGk="})
        ticket.release_all()
    assert kserve.status_code == openai.status_code == 429
    assert set(kserve.json()) == {"error"} and "capacity" in kserve.json()["error"]
    assert openai.json()["error"]["code"] == "queue_full"
    assert openai.json()["error"]["type"] == "rate_limit_error"
    assert sample(app, "hiera_requests_received_total", endpoint="kserve_infer") == 1
    assert sample(app, "hiera_requests_received_total", endpoint="openai_embeddings") == 1


async def test_unauthenticated_callers_get_401_not_the_load(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, api_keys="k-123"))
    async with running(app) as client:
        service = app.state.service
        ticket = service.admit(service.admission.capacity)
        anonymous = await client.post("/v1/classify", content=make_image(2), headers=JPEG)
        keyed = await client.post(
            "/v1/classify", content=make_image(2), headers=JPEG | {"X-API-Key": "k-123"}
        )
        ticket.release_all()
    assert anonymous.status_code == 401 and keyed.status_code == 429


async def test_a_service_that_is_not_ready_refuses_with_503(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        app.state.service.fail(RuntimeError("runtime gone"))
        refused = await client.post("/v1/classify", content=b"x", headers=JPEG)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    assert refused.headers["Retry-After"] == "5"
