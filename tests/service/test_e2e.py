"""End to end: the real `hiera-serve` process on a free port, real HTTP, real JPEG/PNG files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.hiera import BuiltModel
from tests.service.helpers import free_port, make_image, wait_ok
from tests.service.reference import reference

pytestmark = pytest.mark.slow

Server = tuple[str, subprocess.Popen[bytes], Path]


def _serve(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "service.cli", *args]
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


@pytest.fixture
def server(micro_repository: Path, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / "server.log"
    process = _serve(
        "--model-repository", str(micro_repository), "--port", str(port), "--device", "cpu",
        "--max-batch-size", "4", "--max-delay-ms", "50", "--intra-op-threads", "1",
        "--no-batch-cap-from-warmup", log=log,  # batches must form: no timed cap of 1
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(f"{url}/health/ready", process, log, within_s=90)
        yield url, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def test_real_server_answers_concurrent_images(server: Server, micro_model: BuiltModel) -> None:
    url, process, log = server
    images = [make_image(s, size=(300 + 7 * s, 200 + 5 * s), fmt="JPEG" if s % 2 else "PNG")
              for s in range(12)]  # fmt: skip

    async def fire() -> tuple[str, list[httpx.Response], list[httpx.Response], str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            before = (await client.get("/metrics")).text
            kinds = ["jpeg" if s % 2 else "png" for s in range(12)]
            embeds = client_posts(client, "/v1/embed?normalize=false", images, kinds)
            classes = client_posts(client, "/v1/classify?top_k=3", images, kinds)
            embedded = await asyncio.gather(*embeds)
            classified = await asyncio.gather(*classes)
            after = (await client.get("/metrics")).text
        return before, embedded, classified, after

    before, embedded, classified, after = asyncio.run(fire())
    assert [r.status_code for r in embedded + classified] == [200] * 24
    for data, emb, cls in zip(images, embedded, classified, strict=True):
        logits, want = reference(micro_model, data)
        np.testing.assert_allclose(emb.json()["embedding"], want, rtol=0, atol=1e-4)
        assert [c["index"] for c in cls.json()["labels"]] == np.argsort(-logits)[:3].tolist()
    assert max(r.json()["timing"]["batch_size"] for r in embedded) > 1

    old, new = _counters(before), _counters(after)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return new.get(key, 0.0) - old.get(key, 0.0)

    assert delta("hiera_requests_total", endpoint="embed", status="200") == 12
    assert delta("hiera_requests_total", endpoint="classify", status="200") == 12
    assert delta("hiera_stage_duration_seconds_count", endpoint="embed", stage="inference") == 12
    assert delta("hiera_image_bytes_count") == 24
    assert delta("hiera_batch_size_sum") == 24
    assert delta("hiera_batch_size_count") < 24  # batches formed

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert any(m.startswith("ready: hiera_micro on onnx") for m in messages), messages
    assert any("RANDOM WEIGHTS" in m for m in messages)
    assert "Application shutdown complete." in messages  # drained, not killed


def client_posts(
    client: httpx.AsyncClient, path: str, images: list[bytes], kinds: list[str]
) -> list[object]:
    return [
        client.post(path, content=data, headers={"Content-Type": f"image/{kind}"})
        for data, kind in zip(images, kinds, strict=True)
    ]


def test_server_exits_nonzero_when_the_model_cannot_load(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    log = tmp_path / "server.log"
    process = _serve("--model-repository", str(empty), "--port", str(free_port()), log=log)
    try:
        assert process.wait(timeout=60) == 1
    finally:
        if process.poll() is None:
            process.kill()
    errors = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (failure,) = [e for e in errors if e["level"] == "error"]
    assert "holds no model" in failure["message"] and "hiera-export" in failure["message"]
    assert "exc" not in failure  # a configuration error is one clear line, not a traceback


def test_server_refuses_a_missing_path_before_binding(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = _serve("--model-repository", str(tmp_path / "absent"), log=log)
    assert process.wait(timeout=60) == 2
    output = log.read_text()
    assert "does not exist; run hiera-export first" in output
    assert "Uvicorn running" not in output
