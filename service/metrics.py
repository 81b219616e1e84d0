"""Every Prometheus metric the service exports, defined once, on a registry per app."""

from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Sub-millisecond decode of a thumbnail up to multi-second queueing under overload.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 27, 2))  # 1 KiB .. 64 MiB
PIXEL_BUCKETS = (1e4, 5e4, 1e5, 2.5e5, 5e5, 1e6, 2e6, 4e6, 8e6, 1.6e7, 3.2e7, 6.4e7)

STAGES = ("decode", "preprocess", "queue", "inference", "postprocess")

# The ASGI scope key an inference route sets when it counts a request received, so the
# middleware counts one outcome for exactly those requests.
RECEIVED_SCOPE_KEY = "hiera.received"


def outcome_of(status: int) -> str:
    """Return the outcome an answer with HTTP `status` counts as.

    Every request an inference route receives ends in exactly one outcome, so /metrics alone
    shows `hiera_requests_received_total` == the sum of `hiera_request_outcomes_total` over
    ok, rejected, invalid, cancelled, timed_out and failed (plus the requests in flight).
    """
    if status < 400:
        return "ok"
    if status in (429, 503):  # at capacity, loading, broken or shutting down: retry elsewhere
        return "rejected"
    if status == 499:  # the client hung up first
        return "cancelled"
    if status == 504:
        return "timed_out"
    return "invalid" if status < 500 else "failed"


class Metrics:
    """The service's metrics; one instance per app so tests get isolated registries.

    With `workers > 1` (Prometheus multiprocess mode) every value lives in a per-process file
    under PROMETHEUS_MULTIPROC_DIR, and `registry` is the scrape registry that reads the files
    of every worker, so one scrape of any worker counts them all.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, workers: int = 1, shared: bool = False
    ) -> None:
        self.workers = workers
        # `shared`: other processes (an engine) write into the same scrape even with one worker.
        self.multiprocess_dir = _multiprocess_dir() if workers > 1 or shared else None
        self.gpu_sampler: GpuSampler | None = None
        self.registry = registry or CollectorRegistry()
        # In multiprocess mode the files are the registry: registering the metric objects too
        # would export each series twice.
        r = None if self.multiprocess_dir else self.registry
        self.requests = Counter(
            "hiera_requests", "HTTP requests answered.", ["endpoint", "status"], registry=r
        )
        self.received = Counter(
            "hiera_requests_received",
            "Inference requests received (one per HTTP request, whatever its image count).",
            ["endpoint"],
            registry=r,
        )
        self.outcomes = Counter(
            "hiera_request_outcomes",
            "Inference requests answered, once each, by outcome: ok, rejected (429/503), "
            "invalid (other 4xx), cancelled (client hung up), timed_out (504), failed (5xx).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.outcome_seconds = Counter(
            "hiera_request_outcome_seconds",
            "Time from received to answered, summed per outcome (Triton's success/fail ns).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "hiera_request_duration_seconds",
            "Time from request received to response ready.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "hiera_stage_duration_seconds",
            "Time per image in each stage: decode, preprocess, queue, inference, postprocess.",
            ["endpoint", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "hiera_batch_size", "Images per batch sent to a model.", buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.batch_inference = Histogram(
            "hiera_batch_inference_seconds",
            "Wall time of one batch on one model instance.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Gauge modes only matter across workers: sums over live workers, no `pid` label.
        self.queue_depth = Gauge(
            "hiera_queue_depth", "Images waiting for a batch.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.in_flight = Gauge(
            "hiera_requests_in_flight", "HTTP requests being handled.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.failures = Counter(
            "hiera_failures",
            "Requests or images answered with an error, once each, by error code.",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "hiera_dropped",
            "Queued images dropped before reaching the model (cancelled, deadline, closed).",
            ["reason"],
            registry=r,
        )
        self.admitted = Gauge(
            "hiera_admitted_images",
            "Images admitted and not yet answered (decoding, queued or running).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_failures = Counter(
            "hiera_batch_failures",
            "Batches whose inference raised; each fails only its own requests.",
            registry=r,
        )
        self.runtime_broken = Gauge(
            "hiera_runtime_broken",
            "1 when the runtime is broken for good (liveness fails).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.runtime_errors = Counter(
            "hiera_runtime_errors",
            "Model runtime failures (load, inference, dead worker); each one flips readiness.",
            registry=r,
        )
        self.image_bytes = Histogram(
            "hiera_image_bytes", "Encoded size of each image.", buckets=BYTES_BUCKETS, registry=r
        )
        self.image_pixels = Histogram(
            "hiera_image_pixels", "Width x height of each decoded image.", buckets=PIXEL_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.model_load = Gauge(
            "hiera_model_load_duration_seconds",
            "Time to load and warm every model instance.",
            registry=r,
            multiprocess_mode="livemax",
        )
        # Label children cached per label set: endpoints, stages and statuses are few.
        self._stage_children: dict[tuple[str, str], Histogram] = {}
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._received_children: dict[str, Counter] = {}
        self._outcome_children: dict[tuple[str, int], tuple[Counter, Counter]] = {}
        self._failure_children: dict[str, Counter] = {}
        # Every worker serves the same model, so the answering worker's own info is the
        # service's (an Info metric has no multiprocess form).
        self.model_info = Info("hiera_model", "The model being served.", registry=self.registry)
        if self.multiprocess_dir is None:
            self.ready = Gauge("hiera_ready", "1 when the service accepts inference.", registry=r)
            return
        # Each worker adds 1 while it is ready; `hiera_ready` is computed from the sum at scrape
        # time, so it is 1 only when all `workers` are present and ready.
        self.ready = Gauge(
            "hiera_workers_ready", "Worker processes that accept inference.", registry=None,
            multiprocess_mode="livesum",
        )  # fmt: skip
        MultiProcessCollector(self.registry, path=self.multiprocess_dir)
        self.registry.register(_WorkersReadyCollector(self))

    def stage(self, endpoint: str, stage: str) -> Histogram:
        """Return the stage-duration child for these labels, created once (labels() is slow)."""
        key = (endpoint, stage)
        child = self._stage_children.get(key)
        if child is None:
            child = self._stage_children[key] = self.stage_duration.labels(endpoint, stage)
        return child

    def failed(self, reason: str) -> None:
        """Count one request or image answered with the error code `reason`."""
        child = self._failure_children.get(reason)
        if child is None:
            child = self._failure_children[reason] = self.failures.labels(reason)
        child.inc()

    def request_received(self, endpoint: str) -> None:
        """Count one inference request received; `request_done(received=True)` ends it."""
        child = self._received_children.get(endpoint)
        if child is None:
            child = self._received_children[endpoint] = self.received.labels(endpoint)
        child.inc()

    def request_done(
        self, endpoint: str, status: int, seconds: float, *, received: bool = False
    ) -> None:
        """Count one answered request (and its outcome, if it was received) and its duration."""
        children = self._request_children.get((endpoint, status))
        if children is None:
            children = self._request_children[(endpoint, status)] = (
                self.requests.labels(endpoint, str(status)),
                self.request_duration.labels(endpoint),
            )
        children[0].inc()
        children[1].observe(seconds)
        if received:
            # Created on first use: a probe or a scrape never shows up as an outcome series.
            outcome = self._outcome_children.get((endpoint, status))
            if outcome is None:
                labels = (endpoint, outcome_of(status))
                outcome = self._outcome_children[(endpoint, status)] = (
                    self.outcomes.labels(*labels),
                    self.outcome_seconds.labels(*labels),
                )
            outcome[0].inc()
            outcome[1].inc(seconds)

    def ready_workers(self) -> int:
        """Return how many live workers are ready (multiprocess mode: read every worker's file)."""
        if self.multiprocess_dir is None:
            raise RuntimeError("ready_workers() needs multiprocess mode (workers > 1)")
        files = glob.glob(os.path.join(self.multiprocess_dir, "gauge_livesum_*.db"))
        for metric in MultiProcessCollector.merge(files):
            if metric.name == "hiera_workers_ready":
                return round(sum(sample.value for sample in metric.samples))
        return 0

    def enable_gpu_metrics(self, gpus: Mapping[str, str]) -> bool:
        """Export NVML utilisation and memory for the GPUs served on ({"cuda:0": uuid, ...}).

        Matched by UUID: NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so
        its index 0 is not necessarily CUDA's (or this process's) device 0.
        """
        collector = NvmlCollector.create(gpus)
        if collector is None:
            return False
        if self.multiprocess_dir is None:
            self.registry.register(collector)  # read at scrape time
            return True
        # Workers: a scrape reaches one worker, which cannot read another's NVML handles at
        # scrape time. Each samples its own GPUs into the shared files instead, so any scrape
        # shows every live worker's GPUs (a GPU shared by workers: the same reading, max).
        gauges = [
            Gauge(name, help_text, ["gpu", "device"], registry=None, multiprocess_mode="livemax")
            for name, help_text in NvmlCollector.FAMILIES
        ]
        self.gpu_sampler = GpuSampler(collector, gauges)
        self.gpu_sampler.sample()  # the first reading is there before the first scrape
        self.gpu_sampler.start()
        return True


def _multiprocess_dir() -> str:
    """Return PROMETHEUS_MULTIPROC_DIR, checking that prometheus_client writes files there."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    # prometheus_client picks file-backed values when it is first imported, from the same
    # variable: the supervisor sets it before a worker starts.
    if not path or not os.path.isdir(path) or not getattr(values.ValueClass, "_multiprocess", 0):
        raise RuntimeError(
            "workers > 1 needs PROMETHEUS_MULTIPROC_DIR (an existing folder) set before the "
            "process starts; run through `hiera-serve --workers N`, which sets it"
        )
    return path


class _WorkersReadyCollector(Collector):
    """Export `hiera_ready`: 1 only when every one of the expected workers is ready."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = self._metrics.ready_workers() >= self._metrics.workers
        yield GaugeMetricFamily(
            "hiera_ready", "1 when every worker accepts inference.", value=1.0 if ready else 0.0
        )


class BatcherMetrics:
    """Adapt the batcher's observer hooks onto Metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def queue_depth(self, depth: int) -> None:
        self._m.queue_depth.set(depth)

    def queue_wait(self, seconds: float) -> None:
        pass  # observed per request with its endpoint label, from BatchResult

    def batch_dispatched(self, size: int) -> None:
        self._m.batch_size.observe(size)

    def batch_done(self, size: int, seconds: float, ok: bool) -> None:
        self._m.batch_inference.observe(seconds)

    def dropped(self, reason: str) -> None:
        self._m.dropped.labels(reason=reason).inc()


class NvmlCollector(Collector):
    """Read GPU utilisation and memory from NVML at scrape time."""

    FAMILIES = (
        ("hiera_gpu_utilization_ratio", "GPU busy fraction over the last sample."),
        ("hiera_gpu_memory_used_bytes", "GPU memory used."),
        ("hiera_gpu_memory_total_bytes", "GPU memory."),
    )

    def __init__(self, nvml: object, gpus: list[tuple[str, str, object]]) -> None:
        self._nvml = nvml
        self._gpus = gpus  # (uuid, cuda device, NVML handle)

    @classmethod
    def create(cls, gpus: Mapping[str, str]) -> NvmlCollector | None:
        if not gpus:
            return None
        try:
            import pynvml  # from nvidia-ml-py, installed with the gpu extra

            pynvml.nvmlInit()
            found = [
                (uuid, device, pynvml.nvmlDeviceGetHandleByUUID(uuid))
                for device, uuid in sorted(gpus.items())
            ]
        except Exception as exc:  # no library, no driver, or a GPU NVML does not know
            log.info("GPU metrics disabled: %s", exc)
            return None
        return cls(pynvml, found)

    def read(self) -> list[tuple[list[str], tuple[float, float, float]]]:
        """Return ([uuid, device], (utilisation ratio, used bytes, total bytes)) per GPU."""
        nvml = self._nvml
        readings = []
        for uuid, device, handle in self._gpus:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)  # type: ignore[attr-defined]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
            except Exception:  # a GPU lost mid-scrape must not break /metrics
                log.warning("NVML read failed for GPU %s (%s)", uuid, device, exc_info=True)
                continue
            readings.append(
                ([uuid, device], (rates.gpu / 100.0, float(memory.used), float(memory.total)))
            )
        return readings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily(name, help_text, labels=["gpu", "device"])
            for name, help_text in self.FAMILIES
        ]
        for labels, values_ in self.read():
            for family, value in zip(families, values_, strict=True):
                family.add_metric(labels, value)
        yield from families


class GpuSampler(threading.Thread):
    """Copy NVML readings into multiprocess gauges every `interval_s` (workers mode)."""

    def __init__(self, source: NvmlCollector, gauges: list[Gauge], interval_s: float = 5.0):
        super().__init__(name="hiera-nvml", daemon=True)
        self._source, self._gauges, self._interval_s = source, gauges, interval_s
        self._stop = threading.Event()

    def sample(self) -> None:
        for labels, values_ in self._source.read():
            for gauge, value in zip(self._gauges, values_, strict=True):
                gauge.labels(*labels).set(value)

    def run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()
