"""A real hiera-serve process shared by the deployment tests, loaded once per session."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.helpers import start_server, wait_ready
from tests.service.helpers import free_port, make_image


@pytest.fixture(scope="session")
def live_url(micro_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serve the micro model on a free loopback port, with every metric family observed once."""
    log = tmp_path_factory.mktemp("live_server") / "server.log"
    port = free_port()
    process = start_server(micro_repository, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log, within_s=90)
        jpeg = {"Content-Type": "image/jpeg"}
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/classify", content=make_image(1), headers=jpeg).is_success
            assert client.post("/v1/embed", content=make_image(2), headers=jpeg).is_success
            # A truncated JPEG, so the failure counter has a labelled series too.
            broken = make_image(3)[:300]
            assert client.post("/v1/classify", content=broken, headers=jpeg).status_code == 400
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except Exception:
                process.kill()
                process.wait(10)
