"""At capacity, inference requests are refused at the door: before routing or reading a body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Scope

from service.app import create_app
from service.batching import QueueFull
from service.front import FrontPolicy
from service.metrics import Metrics
from service.middleware import RequestIds
from service.refusal_gate import RefusalGate
from service.routes import native
from tests.service.fault_server import commanded_server
from tests.service.helpers import make_image, repository_settings, running, sample
from tests.service.test_failures_e2e import poll, scrape, value

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


async def test_the_door_looks_again_once_the_body_has_arrived() -> None:
    # Room when the headers arrive, none once the body has (another request took the last
    # place meanwhile): the door refuses; the app never sees the request.
    full = False
    routed: list[Scope] = []
    sent: list[Message] = []

    async def app(scope: Scope, receive: object, send: object) -> None:
        routed.append(scope)

    async def receive() -> Message:
        nonlocal full
        full = True
        return {"type": "http.request", "body": b"jpeg", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    metrics = Metrics()
    gate = RefusalGate(
        app,
        routes=native.router.routes,
        refusal=lambda: QueueFull("full", retry_after_s=3) if full else None,
        metrics=metrics,
        ids=RequestIds(),
        policy=FrontPolicy(max_body_bytes=100),
    )
    headers = [(b"content-length", b"4"), (b"x-request-id", b"door-1")]
    scope = {"type": "http", "method": "POST", "path": "/v1/embed", "headers": headers}
    await gate(scope, receive, send)
    assert routed == []
    assert sent[0]["status"] == 429
    assert (b"retry-after", b"3") in sent[0]["headers"]
    assert (b"x-request-id", b"door-1") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["request_id"] == "door-1"
    registry = metrics.registry
    assert registry.get_sample_value("hiera_requests_received_total", {"endpoint": "embed"}) == 1
    outcome = {"endpoint": "embed", "outcome": "rejected"}
    assert registry.get_sample_value("hiera_request_outcomes_total", outcome) == 1


async def test_a_burst_is_refused_at_the_door_not_in_the_routes(micro_repository: Path) -> None:
    # Two places left and ten requests at once: two admitted, eight refused, and all eight by
    # the door. A route admits in the same turn of the event loop as the door's last look, so
    # none passes the look and then meets a full service in the route (the slow refusal).
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        service = app.state.service
        held = service.admit(service.admission.capacity - 2)
        admit, in_route = service.admit, []

        def counting_admit(count: int = 1) -> object:
            try:
                return admit(count)
            except QueueFull:
                in_route.append(count)
                raise

        service.admit = counting_admit
        answers = await asyncio.gather(
            *(client.post("/v1/classify", content=make_image(i), headers=JPEG) for i in range(10))
        )
        held.release_all()
    assert sorted(a.status_code for a in answers) == [200] * 2 + [429] * 8
    assert in_route == []


async def test_what_the_door_cannot_answer_alone_goes_through_the_stack(
    micro_repository: Path,
) -> None:
    settings = repository_settings(micro_repository, cors_origins="https://app.example.com")
    app = create_app(settings)
    async with running(app) as client:
        service = app.state.service
        ticket = service.admit(service.admission.capacity)
        # A browser's request: the refusal must carry CORS headers, which the stack adds.
        cors = await client.post(
            "/v1/classify",
            content=make_image(1),
            headers=JPEG | {"Origin": "https://app.example.com"},
        )
        # A body over the limit is refused for its size, full or not.
        limit = settings.max_body_bytes
        big = await client.post("/v1/classify", content=b"x" * (limit + 1), headers=JPEG)
        lost = await client.post("/v1/nowhere", content=b"x", headers=JPEG)
        ticket.release_all()
    assert cors.status_code == 429
    assert cors.headers["access-control-allow-origin"] == "https://app.example.com"
    assert (big.status_code, big.json()["error"]["code"]) == (413, "body_too_large")
    assert lost.status_code == 404


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


@pytest.mark.slow
def test_a_refused_upload_gets_its_whole_answer_over_a_real_socket(
    micro_repository: Path, tmp_path: Path
) -> None:
    # Capacity 2 (queue 1 + one batch of 1); batches stall, so two requests fill it.
    args = ("--max-queue-size", "1", "--max-batch-size", "1", "--no-batch-cap-from-warmup")
    with commanded_server(micro_repository, tmp_path, *args) as server:
        server.command(delay_s=30.0)  # far longer than the test: the service stays full
        parts = urlsplit(server.url)
        host, port = parts.hostname or "", parts.port or 0
        for _ in range(2):  # left running; the server is killed at the end of the block
            threading.Thread(target=_hold, args=(host, port), daemon=True).start()
        poll(lambda: value(scrape(server.url), "hiera_admitted_images") == 2, "full", server)
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"][0]
        assert models["batching"]["capacity"] == 2
        # A large upload, refused before its body is parsed: the server must still read it
        # to its end before closing, or the client's socket gets RST and loses the 429.
        body = make_image(1, size=(1600, 1200)) * 8
        answers = [_raw_post(host, port, body) for _ in range(5)]
        assert value(scrape(server.url), "hiera_admitted_images") == 2  # still the two holders
    assert [a[0] for a in answers] == [b"HTTP/1.1 429 Too Many Requests"] * 5
    for status_line, payload in answers:
        assert status_line.startswith(b"HTTP/1.1 429"), status_line
        assert json.loads(payload)["error"]["code"] == "queue_full"


def _hold(host: str, port: int) -> None:
    with contextlib.suppress(OSError):  # cut off when the server is killed
        _raw_post(host, port, make_image(0))


def _raw_post(host: str, port: int, body: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: hiera\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], payload
