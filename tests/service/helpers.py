"""Helpers for the service tests: images, a running app, metrics and real servers.

Expected model answers come from tests/service/reference.py, which does not use the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image

from service.app import create_app
from service.imaging import Preprocessing
from service.settings import Settings

MICRO_PP = Preprocessing(
    input_size=(224, 224),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bicubic",
    crop_pct=0.9,
)


def make_image(seed: int, size: tuple[int, int] = (320, 240), fmt: str = "JPEG") -> bytes:
    """Return an encoded image of random smooth-ish colours, distinct per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def repository_settings(repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_repository": repository,
        "backend": "onnx",
        "device": "cpu",
        "intra_op_threads": 1,
        "max_batch_size": 4,
        "max_delay_ms": 20.0,
        "decode_threads": 2,
        "log_format": "text",
        # Batches up to max_batch_size, as the tests expect; the timed cap has its own tests.
        "batch_cap_from_warmup": False,
    }
    return Settings(**(values | overrides))


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan, wait for loading to end, and yield a client bound to it."""
    async with app.router.lifespan_context(app):
        await app.state.service.loaded.wait()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hiera.test") as client:
            yield client


@contextlib.asynccontextmanager
async def serving(repository: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with running(create_app(repository_settings(repository, **overrides))) as client:
        yield client


def sample(app: FastAPI, name: str, **labels: str) -> float:
    """Return a metric sample's current value (0 when it has not been observed yet)."""
    value = app.state.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


async def wait_until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll `condition` on the event loop until it holds; fail the test after `within_s`."""
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - the code under test exposes no event for this
            await asyncio.sleep(0.005)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ok(
    url: str, process: subprocess.Popen[bytes], log: Path, within_s: float, poll_s: float = 0.2
) -> None:
    """Poll `url` until it answers 200, as an orchestrator would; fail with the process's log."""
    deadline = time.monotonic() + within_s
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} not 200 in {within_s} s:\n{log.read_text()}"
        time.sleep(poll_s)


@contextlib.contextmanager
def ready_process(
    module: str, repository: Path, log: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `python -m module` as a server on 127.0.0.1:<free port>; yield (url, process) once
    /health/ready is 200, and kill it afterwards."""
    port = free_port()
    command = [
        sys.executable, "-m", module, "--model-repository", str(repository),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
        "--intra-op-threads", "1", *args,
    ]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | (env or {})
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(f"{url}/health/ready", process, log, within_s=90)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def live_server(repository: Path, log: Path, *args: str) -> Iterator[str]:
    """Run a real `hiera-serve` on 127.0.0.1:<free port>, yield its URL once it is ready."""
    with ready_process("service.cli", repository, log, *args) as (url, _):
        yield url
