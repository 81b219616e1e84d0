"""Failure semantics in a real `hiera-serve` process, driven over HTTP.

The model fails, stalls or hangs on command (tests/service/fault_server.py): a transient
failure fails only its own requests, a sticky one breaks readiness and liveness, a hung batch
trips the watchdog, and SIGTERM ends the process on time even while a batch hangs.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.fault_server import SECRET, Server, commanded_server
from tests.service.helpers import make_image

pytestmark = pytest.mark.slow

JPEG = {"Content-Type": "image/jpeg"}
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Scrape:
    """Return every sample of one /metrics scrape, keyed by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Scrape, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def poll(check: Callable[[], bool], what: str, server: Server, within_s: float = 20.0) -> None:
    """Wait until `check()` holds (the server exposes no event to wait on from outside)."""
    deadline = time.monotonic() + within_s
    while not check():
        assert server.process.poll() is None, server.log.read_text()
        assert time.monotonic() < deadline, f"{what} not seen in {within_s} s"
        time.sleep(0.02)


def probes(url: str) -> tuple[int, int]:
    ready = httpx.get(f"{url}/health/ready", timeout=10).status_code
    live = httpx.get(f"{url}/health/live", timeout=10).status_code
    return ready, live


def classify(url: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", content=make_image(seed), headers=JPEG, timeout=30)


def test_transient_failures_fail_their_requests_and_sticky_ones_break_the_probes(
    micro_repository: Path, tmp_path: Path
) -> None:
    with commanded_server(micro_repository, tmp_path, "--max-consecutive-failures", "3") as server:
        url = server.url
        before = scrape(url)
        server.command(fail=2)  # transient: the next 2 batches raise
        transient = [classify(url, seed) for seed in range(2)]  # one after the other: 2 batches
        during = probes(url)
        recovered = [classify(url, seed) for seed in (2, 3)]
        middle = scrape(url)

        server.command(sticky=True)  # every batch raises from now on
        sticky, after_each = [], []
        for seed in range(4, 7):
            sticky.append(classify(url, seed))
            after_each.append(probes(url))
        refused = classify(url, 7)
        ready = httpx.get(f"{url}/health/ready", timeout=10)
        live = httpx.get(f"{url}/health/live", timeout=10)
        after = scrape(url)
        still_running = server.process.poll() is None

    for answer in transient + sticky:
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
        assert error["code"] == "internal_error"
        assert error["message"] == "inference failed; see the server log"
        assert error["request_id"] == answer.headers["x-request-id"]
        assert "secret" not in answer.text and "CUDA" not in answer.text
    assert SECRET in server.log.read_text()  # the details went to the log instead
    # Transient: the service stays ready and live, and the next requests are served.
    assert during == (200, 200)
    assert [r.status_code for r in recovered] == [200, 200]
    assert delta(before, middle, "hiera_batch_failures_total") == 2
    assert delta(before, middle, "hiera_failures_total", reason="internal_error") == 2
    assert delta(before, middle, "hiera_request_outcomes_total", endpoint="classify",
                 outcome="failed") == 2  # fmt: skip
    assert delta(before, middle, "hiera_request_outcomes_total", endpoint="classify",
                 outcome="ok") == 2  # fmt: skip
    assert value(middle, "hiera_runtime_broken") == 0 and value(middle, "hiera_ready") == 1
    # Sticky: the third failure in a row breaks readiness and liveness together.
    assert after_each == [(200, 200), (200, 200), (503, 503)]
    assert ready.json() == {"status": "not_ready", "state": "failed",
                            "reason": "3 batches in a row failed"}  # fmt: skip
    assert live.json() == {"status": "broken", "reason": "3 batches in a row failed"}
    assert live.headers["retry-after"] == ready.headers["retry-after"] == "5"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    assert refused.headers["retry-after"] == "5"
    assert delta(middle, after, "hiera_batch_failures_total") == 3
    assert delta(middle, after, "hiera_runtime_errors_total") == 1
    assert value(after, "hiera_runtime_broken") == 1 and value(after, "hiera_ready") == 0
    assert delta(middle, after, "hiera_request_outcomes_total", endpoint="classify",
                 outcome="rejected") == 1  # fmt: skip
    assert still_running  # a lone process waits, liveness failing, to be restarted


def test_a_hung_batch_trips_the_watchdog(micro_repository: Path, tmp_path: Path) -> None:
    args = ("--batch-timeout-s", "2", "--request-timeout-s", "0.5")
    with commanded_server(micro_repository, tmp_path, *args) as server:
        url = server.url
        before = scrape(url)
        server.command(hang_s=60)
        with httpx.Client(base_url=url, timeout=30) as client:
            started = time.monotonic()
            late = client.post("/v1/embed", content=make_image(0), headers=JPEG)
            # The batch has hung for ~0.5 s of its 2 s: not yet a broken runtime.
            hanging = probes(url)
            poll(lambda: probes(url) != (200, 200), "the watchdog", server)
            tripped_s = time.monotonic() - started
            ready, live = client.get("/health/ready"), client.get("/health/live")
            refused = client.post("/v1/embed", content=make_image(1), headers=JPEG)
        after = scrape(url)

    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert hanging == (200, 200)
    assert (ready.status_code, live.status_code) == (503, 503)
    reason = "a batch on instance 0 has run for over 2 s (batch_timeout_s)"
    assert ready.json()["reason"] == live.json()["reason"] == reason
    # The watchdog looks every quarter of the timeout: tripped after 2 s, at most ~0.5 s late.
    assert 2.0 <= tripped_s < 4.0
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    assert value(after, "hiera_runtime_broken") == 1
    assert delta(before, after, "hiera_request_outcomes_total", endpoint="embed",
                 outcome="timed_out") == 1  # fmt: skip
    assert delta(before, after, "hiera_batch_failures_total") == 0  # hung, not failed


def test_sigterm_with_a_hung_batch_exits_within_the_drain_timeout(
    micro_repository: Path, tmp_path: Path
) -> None:
    args = ("--drain-timeout-s", "0.5", "--max-batch-size", "1", "--no-batch-cap-from-warmup")
    with commanded_server(micro_repository, tmp_path, *args) as server:
        server.command(hang_s=6)

        def one_running_one_queued() -> bool:
            now = scrape(server.url)
            return value(now, "hiera_batch_size_count") == value(now, "hiera_queue_depth") == 1

        async def scenario() -> tuple[list[httpx.Response], float, int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                posts = [
                    asyncio.create_task(
                        client.post("/v1/embed", content=make_image(seed), headers=JPEG)
                    )
                    for seed in range(2)
                ]
                await asyncio.to_thread(poll, one_running_one_queued, "two requests", server)
                server.process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                answers = await asyncio.gather(*posts)
                status = await asyncio.to_thread(server.process.wait, 30)
                return answers, time.monotonic() - started, status

        answers, exit_s, status = asyncio.run(scenario())
    log = server.log.read_text()
    assert status == 0, log
    # 0.5 s of drain, 0.5 s for the instance to finish before it is abandoned, and uvicorn's
    # own pauses: not the 6 s the batch hangs for.
    assert exit_s < 2.0, f"exit took {exit_s:.2f} s with --drain-timeout-s 0.5\n{log}"
    for answer in answers:  # the running one and the queued one: one answer each
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "shutting_down"
        assert answer.headers["retry-after"] == "5"
    assert "abandoning it" in log
