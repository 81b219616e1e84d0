"""`hiera-serve --workers 2` as a real process tree: shared port, metrics, readiness, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.service.helpers import free_port, make_image

pytestmark = pytest.mark.slow

Server = tuple[str, subprocess.Popen[bytes], Path]
CLASSIFY_200 = (("endpoint", "classify"), ("status", "200"))


def _serve(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "service.cli", "--log-format", "text", *args]
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def _poll(check: Callable[[], bool], what: str, log: Path, within_s: float = 90.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not seen in {within_s} s:\n{log.read_text()}"
        time.sleep(0.05)


def _ready(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/health/ready", timeout=5)
    except httpx.TransportError:
        return None


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def _metrics_dir(log: Path) -> Path:
    match = re.search(r"metrics files in (\S+)\)", log.read_text())
    assert match is not None, log.read_text()
    return Path(match.group(1))


def _classified_by_pid(metrics_dir: Path) -> dict[int, float]:
    """Read each worker's own counter file: how many classify 200s that process answered."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for metric in MultiProcessCollector.merge([str(path)]):
            for s in metric.samples:
                if s.name == "hiera_requests_total" and s.labels == {
                    "endpoint": "classify",
                    "status": "200",
                }:
                    counts[pid] = s.value
    return counts


@pytest.fixture
def two_workers(micro_repository: Path, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    log = tmp_path / "server.log"
    process = _serve(
        "--model-repository", str(micro_repository), "--port", str(port), "--device", "cpu",
        "--workers", "2", "--max-batch-size", "4", "--max-delay-ms", "20",
        "--intra-op-threads", "1", "--decode-threads", "1", log=log,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}", process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for line in log.read_text().splitlines():  # never leave workers behind
            if match := re.search(r"worker \d started \(pid (\d+)", line):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(match.group(1)), signal.SIGKILL)


def test_two_workers_count_together_report_readiness_and_restart(
    two_workers: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, process, log = two_workers
    answers: list[httpx.Response] = []

    def became_ready() -> bool:
        assert process.poll() is None, log.read_text()
        response = _ready(url)
        if response is not None:
            answers.append(response)
        return response is not None and response.status_code == 200

    _poll(became_ready, "readiness", log)
    # Every earlier answer was a 503 that counted fewer than two ready workers.
    assert all(r.status_code == 503 and r.json()["workers"]["ready"] < 2 for r in answers[:-1])
    first = answers[-1].json()["workers"]
    assert (first["ready"], first["total"]) == (2, 2)
    metrics_dir = _metrics_dir(log)

    images = [make_image(seed) for seed in range(40)]

    async def fire() -> list[httpx.Response]:
        # No keep-alive: 40 connections, which the kernel spreads over both workers' sockets.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            posts = [
                client.post("/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
                for data in images
            ]
            return await asyncio.gather(*posts)

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 40

    scrape = httpx.get(f"{url}/metrics", timeout=10).text  # one scrape, whichever worker answers
    assert _samples(scrape, "hiera_requests_total")[CLASSIFY_200] == 40
    assert (
        _samples(scrape, "hiera_stage_duration_seconds_count")[
            (("endpoint", "classify"), ("stage", "inference"))
        ]
        == 40
    )
    assert _samples(scrape, "hiera_ready") == {(): 1.0}
    assert _samples(scrape, "hiera_workers_ready") == {(): 2.0}
    assert "pid=" not in scrape  # gauges are aggregated, not one series per process
    by_pid = _classified_by_pid(metrics_dir)
    assert len(by_pid) == 2 and all(n > 0 for n in by_pid.values()), by_pid
    assert sum(by_pid.values()) == 40

    # Kill one worker: readiness drops to "1 of 2" until the supervisor's replacement is ready.
    victim = answers[-1].json()["workers"]["pid"]
    os.kill(victim, signal.SIGKILL)
    seen: list[dict[str, object]] = []

    def not_ready() -> bool:
        response = _ready(url)
        if response is not None and response.status_code == 503:
            seen.append(response.json())
        return bool(seen)

    _poll(not_ready, "readiness false after a worker died", log, within_s=10)
    assert seen[0]["reason"] == "1 of 2 workers ready"
    assert seen[0]["workers"] == {"ready": 1, "total": 2, "pid": seen[0]["workers"]["pid"]}  # type: ignore[index]
    _poll(lambda: (r := _ready(url)) is not None and r.status_code == 200, "restart", log)
    died = rf"worker \d \(pid {victim}\) died with status -9; restarting"
    assert re.search(died, log.read_text())
    scrape = httpx.get(f"{url}/metrics", timeout=10).text
    # The dead worker's counts stay in the totals; its live gauges left the sums.
    assert _samples(scrape, "hiera_requests_total")[CLASSIFY_200] == 40
    assert _samples(scrape, "hiera_workers_ready") == {(): 2.0}

    # SIGTERM to the supervisor drains every worker, exits 0 and removes the metrics files.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()
    assert log.read_text().count("Application shutdown complete.") == 2
    assert not metrics_dir.exists()


def test_supervisor_exits_1_when_a_worker_cannot_load(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    log = tmp_path / "server.log"
    process = _serve(
        "--model-repository", str(empty), "--port", str(free_port()), "--device", "cpu",
        "--workers", "2", log=log,
    )  # fmt: skip
    try:
        assert process.wait(timeout=90) == 1
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "holds no model" in output
    assert "could not load the model; stopping all workers" in output
    assert not _metrics_dir(log).exists()
