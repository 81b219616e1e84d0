"""Several workers in one test process: file-backed metrics per fake pid, readiness, devices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest, values
from prometheus_client.multiprocess import mark_process_dead

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from service.workers import assign_devices, plan_layout
from tests.service.helpers import make_image, repository_settings, running


class Workers:
    """Build Metrics as worker `pid` would: values in that pid's files under one folder."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        self._monkeypatch = monkeypatch
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))

    @contextlib.contextmanager
    def as_pid(self, pid: int) -> Iterator[None]:
        """Create (and label) metrics inside this block to have them written as `pid`."""
        with self._monkeypatch.context() as patch:
            patch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid))
            yield

    def metrics(self, pid: int, workers: int = 2) -> Metrics:
        with self.as_pid(pid):
            return Metrics(workers=workers)


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workers:
    return Workers(tmp_path, monkeypatch)


def test_one_scrape_sums_every_workers_counters_and_gauges(workers: Workers) -> None:
    first, second = workers.metrics(101), workers.metrics(102)
    with workers.as_pid(101):
        for _ in range(3):
            first.requests.labels("classify", "200").inc()
        first.stage_duration.labels("classify", "inference").observe(0.02)
    with workers.as_pid(102):
        second.requests.labels("classify", "200").inc(2)
        second.stage_duration.labels("classify", "inference").observe(0.2)
    first.queue_depth.set(4)
    second.queue_depth.set(3)
    first.in_flight.set(1)

    for scraped in (first, second):  # either worker answers the same
        value = scraped.registry.get_sample_value
        assert value("hiera_requests_total", {"endpoint": "classify", "status": "200"}) == 5
        labels = {"endpoint": "classify", "stage": "inference"}
        assert value("hiera_stage_duration_seconds_count", labels) == 2
        assert value("hiera_stage_duration_seconds_sum", labels) == pytest.approx(0.22)
        assert value("hiera_queue_depth") == 7 and value("hiera_requests_in_flight") == 1
    assert "pid=" not in generate_latest(first.registry).decode()


def test_ready_only_when_every_expected_worker_is_ready(workers: Workers) -> None:
    first = workers.metrics(201)
    value = first.registry.get_sample_value
    first.ready.set(1)
    # The second worker has not even started: one of two.
    assert first.ready_workers() == 1 and value("hiera_ready") == 0
    second = workers.metrics(202)
    assert first.ready_workers() == 1 and value("hiera_ready") == 0
    second.ready.set(1)
    assert first.ready_workers() == 2 and value("hiera_ready") == 1
    with workers.as_pid(202):
        second.requests.labels("embed", "200").inc()
    # A dead worker leaves the readiness sum; its counts stay in the totals.
    mark_process_dead(202, str(workers.folder))
    assert first.ready_workers() == 1 and value("hiera_ready") == 0
    assert value("hiera_requests_total", {"endpoint": "embed", "status": "200"}) == 1


def test_multiprocess_mode_refuses_to_start_without_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(workers=2)
    # Set after prometheus_client chose in-memory values: the files would stay empty.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="before the process starts"):
        Metrics(workers=2)


async def test_a_ready_worker_answers_not_ready_until_the_other_is(
    workers: Workers, micro_repository: Path
) -> None:
    other = workers.metrics(302)  # the second worker, still loading
    with workers.as_pid(301):
        app = create_app(repository_settings(micro_repository, workers=2))
        async with running(app) as client:
            assert app.state.service.ready
            waiting = await client.get("/health/ready")
            other.ready.set(1)
            ready = await client.get("/health/ready")
            response = await client.post(
                "/v1/classify", content=make_image(0), headers={"Content-Type": "image/jpeg"}
            )
            scrape = (await client.get("/metrics")).text
    assert waiting.status_code == 503 and waiting.headers["retry-after"] == "5"
    body = waiting.json()
    assert (body["status"], body["state"], body["reason"]) == (
        "not_ready", "ready", "1 of 2 workers ready",
    )  # fmt: skip
    assert body["workers"]["ready"] == 1 and body["workers"]["total"] == 2
    assert ready.status_code == 200 and ready.json()["workers"]["ready"] == 2
    assert response.status_code == 200  # each worker serves as soon as it is ready itself
    assert "hiera_ready 1.0" in scrape and "hiera_workers_ready 2.0" in scrape
    assert 'hiera_model_info{backend="onnx",decode_device="cpu",name="hiera_micro"' in scrape


@pytest.mark.parametrize(
    ("visible", "workers", "expected"),
    [
        ([], 3, [[], [], []]),
        (["0"], 2, [["0"], ["0"]]),
        (["0", "1", "2", "3"], 2, [["0", "2"], ["1", "3"]]),
        (["0", "1", "2", "3"], 4, [["0"], ["1"], ["2"], ["3"]]),
        (["4", "6"], 3, [["4"], ["6"], ["4"]]),
        (["GPU-aa", "GPU-bb", "GPU-cc"], 2, [["GPU-aa", "GPU-cc"], ["GPU-bb"]]),
    ],
)
def test_devices_split_round_robin_over_workers(
    visible: list[str], workers: int, expected: list[list[str]]
) -> None:
    assert assign_devices(visible, workers) == expected


def test_gpu_gauges_of_every_worker_reach_one_scrape(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from tests.service.test_metrics import FakeNvml

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    first, second = workers.metrics(501), workers.metrics(502)
    # Each worker sees its one GPU as cuda:0 (CUDA_VISIBLE_DEVICES), NVML knows it by UUID.
    with workers.as_pid(501):
        assert first.enable_gpu_metrics({"cuda:0": "GPU-bbbb"})
    with workers.as_pid(502):
        assert second.enable_gpu_metrics({"cuda:0": "GPU-aaaa"})
    for sampler in (first.gpu_sampler, second.gpu_sampler):
        assert sampler is not None
        sampler.stop()

    value = second.registry.get_sample_value  # scraped through the other worker
    labels = {"gpu": "GPU-bbbb", "device": "cuda:0"}
    assert value("hiera_gpu_utilization_ratio", labels) == pytest.approx(0.37)
    assert value("hiera_gpu_memory_total_bytes", labels) == 80 * 2**30
    # GPU-aaaa fails to read (FakeNvml): absent, and the scrape still works.
    assert value("hiera_gpu_utilization_ratio", {"gpu": "GPU-aaaa", "device": "cuda:0"}) is None
    assert "pid=" not in generate_latest(second.registry).decode()


def _settings(**values: object) -> Settings:
    return Settings(weights="random", **values)  # type: ignore[arg-type]


def test_the_layout_follows_the_host_front_ends_on_a_gpu_host_inline_on_a_cpu_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.settings

    monkeypatch.setattr(service.settings, "available_cores", lambda: 16)
    cpu_host = plan_layout(_settings(workers=3), [])
    assert cpu_host.engines == [] and cpu_host.workers == [[], [], []]
    gpu_host = plan_layout(_settings(), ["0", "1"])
    # One engine per GPU; every core but one per engine serves HTTP (no GPU of their own).
    assert gpu_host.engines == [["0"], ["1"]] and gpu_host.workers == [[]] * 14
    assert plan_layout(_settings(workers=4), ["0"]).workers == [[]] * 4  # --workers decides
    inline = plan_layout(_settings(engine="inline", workers=2), ["0", "1"])
    assert inline.engines == [] and inline.workers == [["0"], ["1"]]
    split_cpu = plan_layout(_settings(engine="process"), [])
    assert split_cpu.engines == [[]] and len(split_cpu.workers) == 15  # one engine for the CPU
    # JPEGs cross the corridor to be decoded by the engines on their GPUs.
    device_decode = plan_layout(_settings(decode_device="cuda"), ["0"])
    assert device_decode.engines == [["0"]]
