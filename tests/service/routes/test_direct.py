"""The direct lane: plain single-image requests answered in front of FastAPI, as FastAPI would.

Two things are checked separately. Which requests the lane takes (a spy stands in for the
stack behind it), and that what it answers is what the stack answers: every case runs once
through the lane and once with the lane switched off (its routes emptied), on the same app,
and the status, body, headers and metric deltas must be equal.
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.types import Receive, Scope, Send

from service.app import create_app
from service.auth import KeyRing
from service.batching import QueueFull
from service.front import FrontPolicy
from service.middleware import RequestIds
from service.routes import direct, native
from service.routes.direct import DirectLane
from tests.service.helpers import make_image, repository_settings, running

JPEG = {"Content-Type": "image/jpeg"}
IMAGE = make_image(3)


@pytest.fixture
def passed_on() -> list[Scope]:
    return []


def spy_stack(passed_on: list[Scope]) -> Any:
    async def stack(scope: Scope, receive: Receive, send: Send) -> None:
        passed_on.append(scope)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"stack"})

    return stack


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "taken"),
    [
        ("POST", "/v1/classify", JPEG, IMAGE, True),
        ("POST", "/v1/classify?top_k=3", JPEG, IMAGE, True),
        ("POST", "/v1/classify", {"Content-Type": "image/png; x=1"}, IMAGE, True),
        ("POST", "/v1/classify", {"Content-Type": "application/octet-stream"}, IMAGE, True),
        ("POST", "/v1/embed?normalize=false&encoding=base64", JPEG, IMAGE, True),
        ("POST", "/v1/embed?encoding=float", JPEG, IMAGE, True),
        # FastAPI's to answer: its parsing, its 415 and 422 messages, its other routes.
        ("POST", "/v1/classify", {"Content-Type": "text/plain"}, IMAGE, False),
        ("POST", "/v1/classify", {}, IMAGE, False),
        ("POST", "/v1/classify?top_k=0", JPEG, IMAGE, False),
        ("POST", "/v1/classify?top_k=-1", JPEG, IMAGE, False),
        ("POST", "/v1/classify?top_k=3&top_k=4", JPEG, IMAGE, False),
        ("POST", "/v1/classify?top_k=%33", JPEG, IMAGE, False),
        ("POST", "/v1/classify?top_k", JPEG, IMAGE, False),
        ("POST", "/v1/classify?topk=3", JPEG, IMAGE, False),
        ("POST", "/v1/classify?normalize=true", JPEG, IMAGE, False),
        ("POST", "/v1/embed?normalize=yes", JPEG, IMAGE, False),
        ("POST", "/v1/embed?encoding=base85", JPEG, IMAGE, False),
        ("POST", "/v1/classify/batch", JPEG, IMAGE, False),
        ("GET", "/v1/classify", JPEG, b"", False),
        ("POST", "/v1/classify", {**JPEG, "Origin": "https://app.example.com"}, IMAGE, False),
        ("POST", "/v1/classify", {**JPEG, "Transfer-Encoding": "chunked"}, IMAGE, False),
        ("POST", "/v1/classify", JPEG, b"x" * 65537, False),  # over the body limit: the 413
    ],
)
async def test_the_lane_takes_only_plain_requests(
    micro_repository: Path,
    passed_on: list[Scope],
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    taken: bool,
) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app):
        lane = DirectLane(
            spy_stack(passed_on),
            service=app.state.service,
            metrics=app.state.metrics,
            ids=RequestIds(),
            policy=FrontPolicy(max_body_bytes=65536, cors=True),
        )
        transport = httpx.ASGITransport(app=lane)
        async with httpx.AsyncClient(transport=transport, base_url="http://lane") as client:
            if headers.get("Transfer-Encoding") == "chunked":

                async def chunks() -> AsyncIterator[bytes]:
                    yield body

                answer = await client.request(method, path, headers=headers, content=chunks())
            else:
                answer = await client.request(method, path, headers=headers, content=body)
    assert (passed_on == []) is taken
    assert answer.status_code == (200 if taken else 299)


@pytest.fixture
def lane_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Call it to empty the lane's routes: every request then goes through the stack."""

    def switch_off() -> None:
        monkeypatch.setattr(direct, "ROUTES", {})

    yield switch_off
    monkeypatch.undo()


def _metrics(app: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = app.state.metrics.registry
    values = {}
    for family in registry.collect():
        if not family.name.startswith("hiera_") or family.type not in ("counter", "histogram"):
            continue
        for s in family.samples:
            # Counts only: a `_seconds_total` counter sums times, which differ run to run.
            if (
                s.name.endswith(("_total", "_count"))
                and not s.name.endswith("_seconds_total")
                and "stage" not in s.labels
            ):
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def _delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def _comparable(answer: httpx.Response) -> dict[str, Any]:
    body = answer.json()
    body.pop("timing", None)  # times differ from one run to the next
    if "embedding" in body and isinstance(body["embedding"], list):
        body["embedding"] = np.round(np.asarray(body["embedding"]), 6).tolist()
    headers = {k: v for k, v in answer.headers.items() if k not in ("date", "server")}
    if "timing" in answer.json():  # the length counts the timing's digits
        headers.pop("content-length")
    return {"status": answer.status_code, "body": body, "headers": headers}


CASES: list[tuple[str, str, bytes]] = [
    ("ok top 3", "/v1/classify?top_k=3", IMAGE),
    ("ok default top k", "/v1/classify", IMAGE),
    ("ok embedding", "/v1/embed", IMAGE),
    ("ok raw embedding, base64", "/v1/embed?normalize=false&encoding=base64", IMAGE),
    ("corrupt image", "/v1/classify", b"\xff\xd8\xff\xe0 not a jpeg at all"),
    ("empty body", "/v1/embed", b""),
    ("top_k over the limit", "/v1/classify?top_k=99999", IMAGE),
]


Prepare = Callable[[Any, httpx.AsyncClient], Awaitable[None]]


async def _both_ways(
    repository: Path, lane_off: Any, prepare: Prepare, path: str, body: bytes, request_id: str
) -> tuple[list[dict[str, Any]], list[dict[Any, float]]]:
    """Post `body` to `path` through the lane, then with the lane off, each time on a fresh app
    (the lane's routes are read when a request arrives) readied by `prepare`; return the two
    comparable answers and the two metric deltas."""
    answers, deltas = [], []
    for through_lane in (True, False):
        if not through_lane:
            lane_off()
        app = create_app(repository_settings(repository))
        async with running(app) as client:
            await prepare(app, client)
            before = _metrics(app)
            headers = {**JPEG, "X-Request-ID": request_id}
            answers.append(_comparable(await client.post(path, content=body, headers=headers)))
            deltas.append(_delta(before, _metrics(app)))
    return answers, deltas


@pytest.mark.parametrize(("case", "path", "body"), CASES, ids=[c[0] for c in CASES])
async def test_the_lane_answers_as_the_stack_does(
    micro_repository: Path, lane_off: Any, case: str, path: str, body: bytes
) -> None:
    async def first_batch(app: Any, client: httpx.AsyncClient) -> None:
        await client.post("/v1/classify", content=IMAGE, headers=JPEG)

    answers, deltas = await _both_ways(
        micro_repository, lane_off, first_batch, path, body, f"case-{case}"
    )
    assert answers[0] == answers[1]
    assert deltas[0] == deltas[1]
    assert deltas[0][("hiera_requests_received_total", (("endpoint", path[4:].split("?")[0]),))]


@pytest.mark.parametrize("state", ["full", "not ready", "broken"])
async def test_refusals_and_failures_in_the_lane_match_the_stack(
    micro_repository: Path, lane_off: Any, state: str
) -> None:
    # The door's look passes; admission or the model then fails inside the route.
    async def into_state(app: Any, client: httpx.AsyncClient) -> None:
        service = app.state.service
        service.refusal = lambda: None  # the gate lets everything through to the route
        if state == "full":

            def full(count: int = 1) -> Any:
                raise QueueFull("full", retry_after_s=2)

            service.admit = full
        elif state == "not ready":
            service.state, service.reason = "draining", "shutting down"
        else:

            async def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("the model fell over")

            service.predict = broken

    answers, deltas = await _both_ways(
        micro_repository, lane_off, into_state, "/v1/classify", IMAGE, "r-1"
    )
    assert answers[0] == answers[1]
    assert deltas[0] == deltas[1]
    expected = {"full": 429, "not ready": 503, "broken": 500}[state]
    assert answers[0]["status"] == expected
    assert answers[0]["headers"]["x-request-id"] == "r-1"
    if state != "broken":
        assert "retry-after" in answers[0]["headers"]


async def test_lane_answers_carry_the_models_outputs(micro_repository: Path) -> None:
    # Parity with the stack could hide a shared mistake: check the lane's answer against the
    # model's own outputs for the same crop.
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        raw = await client.post("/v1/embed?normalize=false&encoding=base64", content=IMAGE,
                                headers=JPEG)  # fmt: skip
        unit = await client.post("/v1/embed", content=IMAGE, headers=JPEG)
        top = await client.post("/v1/classify?top_k=4", content=IMAGE, headers=JPEG)
    vector = np.frombuffer(base64.b64decode(raw.json()["embedding"]), "<f4")
    assert raw.json()["normalized"] is False and vector.shape == (raw.json()["dim"],)
    np.testing.assert_allclose(unit.json()["embedding"], vector / np.linalg.norm(vector),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    labels = top.json()["labels"]
    assert len(labels) == 4
    assert [p["score"] for p in labels] == sorted((p["score"] for p in labels), reverse=True)


def test_the_lane_and_the_stack_share_the_query_defaults() -> None:
    # The lane fills absent parameters from native's constants; the routes' signatures must
    # use the same ones.
    defaults = {
        name: param.default
        for route in native.router.routes
        for name, param in inspect.signature(route.endpoint).parameters.items()
        if name in ("top_k", "normalize", "encoding")
    }
    assert defaults == {
        "top_k": native.DEFAULT_TOP_K,
        "normalize": native.DEFAULT_NORMALIZE,
        "encoding": native.DEFAULT_ENCODING,
    }


async def test_the_gate_and_the_lane_read_a_request_once(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ask whether a request is ordinary; the second gets the first's verdict, so a plain
    # request's key is compared once, and one for the stack once more there (ApiKeyMiddleware).
    compared: list[str] = []
    admits = KeyRing.admits

    def counting(self: KeyRing, scope: Scope) -> bool:
        compared.append(scope["path"])
        return admits(self, scope)

    monkeypatch.setattr(KeyRing, "admits", counting)
    app = create_app(repository_settings(micro_repository, api_keys="k-123"))
    key = {"X-API-Key": "k-123"}
    async with running(app) as client:
        plain = await client.post("/v1/classify", content=IMAGE, headers={**JPEG, **key})
        plain_compares = len(compared)
        form = await client.post("/v1/classify", files={"image": IMAGE}, headers=key)
    assert plain.status_code == form.status_code == 200
    assert plain_compares == 1
    assert len(compared) == 1 + 2
