"""Overload and readiness errors keep the native status codes in every protocol's own shape."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest

from service.app import create_app
from service.batching import QueueFull
from service.routes.protocol import all_or_nothing
from tests.service.helpers import make_image, repository_settings, running, sample

_IMAGE = base64.b64encode(make_image(1)).decode()
_KSERVE = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [_IMAGE]}]}
_OPENAI = {"model": "m", "input": _IMAGE}


async def test_queue_full_and_not_ready(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        service = app.state.service

        async def full(*args: Any, **kwargs: Any) -> None:
            raise QueueFull("queue full")

        service.predict = full
        kserve = await client.post("/v2/models/hiera_micro/infer", json=_KSERVE)
        oai = await client.post("/v1/embeddings", json=_OPENAI)
        assert sample(app, "hiera_failures_total", reason="queue_full") == 2
        assert sample(app, "hiera_requests_total", endpoint="kserve_infer", status="429") == 1
        del service.predict  # the real one again: it checks readiness first
        service.state, service.reason = "draining", "shutting down"
        kserve_ready = await client.get("/v2/health/ready")
        model_ready = await client.get("/v2/models/hiera_micro/ready")
        drained = await client.post("/v1/embeddings", json=_OPENAI)
    assert kserve.status_code == 429 and kserve.headers["retry-after"] == "1"
    assert kserve.json() == {"error": "the server is at capacity; retry shortly"}
    assert oai.status_code == 429 and oai.headers["retry-after"] == "1"
    assert oai.json()["error"]["type"] == "rate_limit_error"
    assert oai.json()["error"]["code"] == "queue_full"
    assert kserve_ready.status_code == 503 and kserve_ready.json() == {"ready": False}
    assert model_ready.status_code == 503
    assert model_ready.json() == {"name": "hiera_micro", "ready": False}
    assert drained.status_code == 503 and drained.headers["retry-after"] == "5"
    assert drained.json()["error"]["code"] == "not_ready"
    assert drained.json()["error"]["type"] == "server_error"


async def test_all_or_nothing_cancels_the_rest_on_first_failure() -> None:
    cancelled: list[str] = []

    async def slow(tag: str) -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(tag)
            raise
        return tag

    async def bad() -> str:
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        await all_or_nothing([slow("a"), bad(), slow("b")])
    assert sorted(cancelled) == ["a", "b"]
    assert await all_or_nothing([asyncio.sleep(0, "x"), asyncio.sleep(0, "y")]) == ["x", "y"]


def _shape_of(path: str) -> str:
    if path.startswith("/v2"):
        return "kserve"
    return "openai" if path == "/v1/embeddings" else "native"


async def test_every_wrong_method_is_405_in_the_routes_shape_with_allow(
    micro_repository: Path,
) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        # The methods each path serves, from the published schema rather than the router.
        paths = (await client.get("/openapi.json")).json()["paths"]
        checked = set()
        for template, operations in paths.items():
            path = template.replace("{name}", "hiera_micro").replace("{version}", "1")
            served = {m.upper() for m in operations}
            # FastAPI routes answer HEAD only where declared: HEAD is checked like the rest.
            for method in sorted({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"} - served):
                answer = await client.request(method, path)
                assert answer.status_code == 405, (method, path)
                assert set(answer.headers["allow"].split(", ")) == served, (method, path)
                if method == "HEAD":
                    continue  # no body
                error = answer.json()["error"]
                shape = _shape_of(template)
                if shape == "kserve":
                    assert isinstance(error, str) and method in error, (method, path)
                elif shape == "openai":
                    assert set(error) == {"message", "type", "param", "code"}
                    assert error["type"] == "invalid_request_error"
                    assert error["code"] == "method_not_allowed" and error["param"] is None
                else:
                    assert error["code"] == "method_not_allowed", (method, path)
                    assert answer.headers["x-request-id"] == error["request_id"]
                checked.add(shape)
        failures = sample(app, "hiera_failures_total", reason="method_not_allowed")
    assert checked == {"kserve", "openai", "native"}
    assert failures > 0
