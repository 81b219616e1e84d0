from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from service.metrics import BatcherMetrics, Metrics


class FakeNvml:
    """Just enough of pynvml for two GPUs, the second of which fails to read."""

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        # NVML's own order (PCI bus) differs from CUDA's here, as it may on a real host.
        return {"GPU-bbbb": 0, "GPU-aaaa": 1}[uuid]

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if handle == 1:
            raise RuntimeError("GPU is lost")
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)


def test_gpu_metrics_follow_the_cuda_devices_served_on_by_uuid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    metrics = Metrics()
    # CUDA's device 1 is NVML's index 0: matching by index would read the wrong (lost) GPU.
    assert metrics.enable_gpu_metrics({"cuda:0": "GPU-aaaa", "cuda:1": "GPU-bbbb"})
    value = metrics.registry.get_sample_value
    served = {"gpu": "GPU-bbbb", "device": "cuda:1"}
    assert value("hiera_gpu_utilization_ratio", served) == pytest.approx(0.37)
    assert value("hiera_gpu_memory_used_bytes", served) == 3 * 2**30
    assert value("hiera_gpu_memory_total_bytes", served) == 80 * 2**30
    # A GPU that fails to read is skipped; the scrape itself still works.
    assert value("hiera_gpu_utilization_ratio", {"gpu": "GPU-aaaa", "device": "cuda:0"}) is None
    assert "hiera_gpu_utilization_ratio gauge" in generate_latest(metrics.registry).decode()


def test_gpu_metrics_disabled_without_nvml_or_without_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    metrics = Metrics()
    assert not metrics.enable_gpu_metrics({"cuda:0": "GPU-aaaa"})
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert not metrics.enable_gpu_metrics({})  # serving on the CPU
    assert "hiera_gpu" not in generate_latest(metrics.registry).decode()


def test_cuda_uuids_are_spelled_as_nvml_spells_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from service.runtime.devices import cuda_uuids

    props = {0: SimpleNamespace(uuid="1c2a-77"), 1: SimpleNamespace(uuid="GPU-9f00-12")}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props[d.index])
    assert cuda_uuids(["cuda:0", "cuda:1", "cpu"]) == {
        "cuda:0": "GPU-1c2a-77",
        "cuda:1": "GPU-9f00-12",
    }


def test_batcher_observer_feeds_metrics() -> None:
    metrics = Metrics()
    observer = BatcherMetrics(metrics)
    observer.queue_depth(7)
    observer.batch_dispatched(4)
    observer.batch_dispatched(2)
    observer.batch_done(4, 0.05, ok=True)
    observer.dropped("cancelled")
    observer.dropped("cancelled")
    value = metrics.registry.get_sample_value
    assert value("hiera_queue_depth") == 7
    assert value("hiera_batch_size_count") == 2 and value("hiera_batch_size_sum") == 6
    assert value("hiera_batch_inference_seconds_sum") == pytest.approx(0.05)
    assert value("hiera_dropped_total", {"reason": "cancelled"}) == 2
    assert value("hiera_failures_total", {"reason": "cancelled"}) is None


def test_registries_are_independent() -> None:
    first, second = Metrics(), Metrics()
    first.requests.labels("classify", "200").inc()
    assert (
        second.registry.get_sample_value(
            "hiera_requests_total", {"endpoint": "classify", "status": "200"}
        )
        is None
    )


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "ok"), (400, "invalid"), (401, "invalid"), (404, "invalid"), (413, "invalid"),
     (415, "invalid"), (422, "invalid"), (429, "rejected"), (499, "cancelled"),
     (500, "failed"), (503, "rejected"), (504, "timed_out")],
)  # fmt: skip
def test_each_answer_of_a_received_request_is_one_outcome(status: int, outcome: str) -> None:
    metrics = Metrics()
    metrics.request_received("embed")
    metrics.request_done("embed", status, 0.01, received=True)
    metrics.request_done("live", 200, 0.001)  # a probe: answered, but not an inference request
    value = metrics.registry.get_sample_value
    assert value("hiera_requests_received_total", {"endpoint": "embed"}) == 1
    assert value("hiera_request_outcomes_total", {"endpoint": "embed", "outcome": outcome}) == 1
    assert value("hiera_requests_total", {"endpoint": "live", "status": "200"}) == 1
    text = generate_latest(metrics.registry).decode()
    outcome_lines = [
        line for line in text.splitlines() if line.startswith("hiera_request_outcomes_total")
    ]
    assert outcome_lines == [
        f'hiera_request_outcomes_total{{endpoint="embed",outcome="{outcome}"}} 1.0'
    ]
