"""The engine: load the model, batch its inputs, run them, and track the runtime's health.

One `Engine` owns one device's runtime pool and dynamic batcher. It knows nothing of HTTP,
admission or decoding: it takes model inputs (uint8 crops or float32 pixels, `[3, H, W]`) and
returns their outputs. The same class runs inside a front end (`--engine inline`) or in an
engine process behind the corridor (`service.engine.process`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from model.artifacts import RepositoryError
from model.checkpoints import CheckpointError
from model.export import ExportError
from model.hiera import WeightsUnavailable
from model.variants import UnknownVariant
from service.batching import BatchResult, DynamicBatcher
from service.card import ModelCard
from service.engine.state import DrainRate, EngineState, Want
from service.metrics import BatcherMetrics, Metrics
from service.runtime.base import BackendError
from service.runtime.devices import cuda_uuids
from service.runtime.loader import plan
from service.runtime.pool import InputSpec, RuntimePool
from service.runtime_health import RuntimeBroken, RuntimeHealth
from service.settings import Settings

log = logging.getLogger(__name__)

# Errors that come from what the operator asked for (paths, weights, devices), not from bugs.
CONFIGURATION_ERRORS = (
    RepositoryError,
    CheckpointError,
    WeightsUnavailable,
    BackendError,
    ExportError,
    UnknownVariant,
)


class Engine:
    """Own the runtime pool, the batcher and the runtime health for one served model.

    `on_state(state, reason)` hears every state change (the front end's readiness follows it);
    `on_broken(exc)` is called once if the loaded runtime breaks for good.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        on_state: Callable[[EngineState, str], None] | None = None,
        on_broken: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state: EngineState = "loading"
        self.reason = "loading the model"
        self.card: ModelCard | None = None
        self.pool: RuntimePool | None = None
        self.batch_cap = settings.max_batch_size  # lowered after warm-up if batching buys nothing
        self.batcher: DynamicBatcher | None = None
        self.backend_name = settings.backend
        self.devices: list[str] = []
        self.providers: list[str] = []
        self.capacity = 0
        self.health = RuntimeHealth(
            max_consecutive_failures=settings.max_consecutive_failures,
            batch_timeout_s=settings.batch_timeout_s,
            on_broken=self._runtime_broken,
        )
        self._on_state = on_state
        self._on_broken = on_broken
        self._completions = DrainRate()
        # True once shutdown had to leave a hung model thread behind: the process must then
        # exit without joining it.
        self.abandoned_threads = False

    @property
    def broken(self) -> bool:
        """Return whether the runtime is broken for good (liveness fails, restart it)."""
        return self.health.broken is not None or (self.state == "failed" and self.card is not None)

    @property
    def model_device(self) -> str:
        """Return where the first instance runs ("cpu", "cuda:0", ...)."""
        return self.pool.instances[0].device if self.pool is not None else "cpu"

    def backlog_seconds(self, images: int) -> float | None:
        """Estimate the model time `images` images need (None while unmeasured)."""
        return self.batcher.backlog_seconds(images) if self.batcher is not None else None

    @property
    def image_seconds(self) -> float:
        """Return the recent model time per image over the instances (0 while unmeasured)."""
        backlog = self.backlog_seconds(1)
        return backlog or 0.0

    @property
    def drain_rate(self) -> float | None:
        """Return images completed per second over the recent completions, None if unknown."""
        return self._completions.rate

    def info(self) -> dict[str, Any]:
        """Return what the model_info metric and /v1/models say about the runtime."""
        return {
            "backend": self.backend_name,
            "provider": ",".join(sorted(set(self.providers))),
            "precision": self.settings.precision,
            "devices": list(self.devices),
            "instances": self.pool.size if self.pool is not None else 0,
            "solo_instance": bool(self.pool is not None and self.pool.solo),
            "batch_cap": self.batch_cap,
            # Whether every instance replays CUDA graphs / ranks and normalises on its device.
            "cuda_graphs": self._every_instance("cuda_graphs"),
            "device_postprocess": self._every_instance("device_top_k"),
            "ms_per_image_by_batch_size": {
                str(size): round(1e3 * t, 3)
                for size, t in (self.pool.per_image_seconds if self.pool else {}).items()
            },
        }

    def _every_instance(self, feature: str) -> bool:
        backends = [i.backend for i in self.pool.all_instances] if self.pool is not None else []
        return bool(backends) and all(
            getattr(backend, feature, None) not in (None, False) for backend in backends
        )

    async def load(self) -> None:
        """Plan, build and warm every instance, then start batching; failures flip the state."""
        started = time.perf_counter()
        try:
            load_plan = await asyncio.to_thread(plan, self.settings)
            card = load_plan.card
            pp = card.preprocessing
            height, width = pp.input_size
            self.pool = await RuntimePool.start(
                load_plan.instances,
                inputs=InputSpec((3, height, width), pp.mean, pp.std),
                max_batch_size=self.settings.max_batch_size,
                time_batches=self.settings.batch_cap_from_warmup,
                niceness=self.settings.thread_niceness,
                solo=load_plan.solo,
            )
            self.batch_cap = self.pool.batch_cap(self.settings.max_batch_size)
            # Everything admitted counts: images decoding, queued, and one capped batch per
            # instance running, so decode work never piles up beyond what the queue holds.
            self.capacity = self.settings.max_queue_size + self.pool.size * self.batch_cap
            self.batcher = DynamicBatcher(
                self.pool.infer,
                collate=list,  # the pool's feeders assemble batches on their own devices
                max_batch_size=self.batch_cap,
                max_delay_ms=self.settings.max_delay_ms,
                # Room for everything admission lets in (queue + one capped batch per instance):
                # admission is the limit. A tighter bound here raced the batcher's own loop (an
                # item not yet popped into its batch still counted as queued) and refused
                # admitted requests after decoding them.
                max_queue_size=self.capacity,
                concurrency=self.pool.size,
                observer=_HealthObserver(BatcherMetrics(self.metrics), self.health, self),
                on_error=self._runtime_broken,
                on_batch_error=self._batch_failed,
                wait_when_idle=self.settings.batch_wait_when_idle,
                # Instances that postprocess on their GPU bring the logits back only on demand.
                pass_logits_wanted=self._every_instance("device_top_k"),
            )
            self.pool.waiting = lambda: self.batcher.queue_depth if self.batcher else 0
            await self.batcher.start()
            self.health.watch(self.pool.all_instances)
        except Exception as exc:
            self.fail(exc)
            raise
        self.card = card
        self.devices = [instance.device for instance in self.pool.all_instances]
        self.providers = [
            getattr(instance.backend, "provider", instance.backend.name)
            for instance in self.pool.all_instances
        ]
        gpus = await asyncio.to_thread(cuda_uuids, self.devices)
        if gpus and self.metrics.enable_gpu_metrics(gpus):
            log.info("GPU metrics enabled (NVML): %s", gpus)
        self.metrics.model_load.set(time.perf_counter() - started)
        if card.random_weights:
            log.warning(
                "SERVING RANDOM WEIGHTS: %s was randomly initialised; predictions are noise",
                card.name,
            )
        solo = " side by side + 1 on every core (adaptive layout)" if self.pool.solo else ""
        log.info(
            "model loaded: %s on %s x%d%s in %.1f s", card.name, self.backend_name,
            self.pool.size, solo, time.perf_counter() - started,
        )  # fmt: skip
        if self.state == "loading":  # not if shutdown began while the model loaded
            self._set_state("ready", "ok")

    async def reserve(self) -> None:
        """Return no slot: in process, the decoder's own array is the input (no copy)."""
        return None

    @property
    def jpeg_device(self) -> None:
        """Say that JPEGs are not handed to this engine undecoded (its front end decodes)."""
        return None

    async def reserve_jpeg(self, size: int) -> None:
        """Return no slot: in process, JPEGs are decoded by the front end's own decoder."""
        return None

    async def submit(
        self, item: Any, deadline: float | None, want: Want | None = None
    ) -> BatchResult:
        """Batch and run one `[3, H, W]` input; raises the batcher's errors. `want` says what
        the caller reads: engines behind a corridor send only that back, and a batch that
        none of whose items wants the logits may leave them on the device (result.logits is
        then empty); top-k and embeddings are always there. None: everything."""
        return await self.enqueue(item, deadline, want)

    def enqueue(
        self, item: Any, deadline: float | None, want: Want | None = None
    ) -> asyncio.Future[BatchResult]:
        """Queue one input without a task of its own; see DynamicBatcher.enqueue."""
        batcher = self.batcher
        if batcher is None:
            from service.errors import NotReady

            raise NotReady(self.reason)
        logits = want is None or want.logits
        return batcher.enqueue(item, deadline=deadline, logits=logits)

    def fail(self, exc: BaseException) -> None:
        """Mark the engine failed after a load failure, a backend error or a dead worker."""
        if isinstance(exc, CONFIGURATION_ERRORS):
            # The message says what to fix; a traceback would only bury it.
            log.error("cannot serve: %s", exc)
        else:
            log.error("model failure, readiness is now false: %r", exc, exc_info=exc)
        self.metrics.runtime_errors.inc()
        # RuntimeBroken's message is ours and says what tripped; others may hold internals.
        reason = str(exc) if isinstance(exc, RuntimeBroken) else None
        self._set_state("failed", reason or f"{type(exc).__name__} in the model runtime")

    async def drain(self, deadline: float) -> None:
        """Stop taking inputs; finish queued and running work by `deadline` (monotonic)."""
        if self.state not in ("failed", "draining", "stopped"):
            self._set_state("draining", "shutting down")
        await self.health.stop()
        if self.batcher is not None:
            left = max(deadline - time.monotonic(), 0.0)
            await self.batcher.close(drain=True, timeout=left)

    async def close(self, deadline: float) -> None:
        """Drain, then release the model; a hung backend call is left behind after `deadline`."""
        await self.drain(deadline)
        if self.pool is not None:
            # A hung backend call must not stretch shutdown past the drain timeout (plus a
            # moment for instances that are merely finishing).
            grace = max(deadline - time.monotonic(), 0.0) + 0.5
            if not await self.pool.close(timeout=grace):
                self.abandoned_threads = True
        if self.state == "draining":
            self._set_state("stopped", "stopped")

    def completed(self, count: int) -> None:
        """Count `count` inputs answered now (the drain rate that Retry-After is made from)."""
        self._completions.completed(count)

    def _batch_failed(self, exc: BaseException) -> None:
        self.metrics.batch_failures.inc()
        self.health.batch_failed(exc)

    def _runtime_broken(self, exc: BaseException) -> None:
        self.fail(exc)
        self.metrics.runtime_broken.set(1)
        if self._on_broken is not None:
            self._on_broken(exc)

    def _set_state(self, state: EngineState, reason: str) -> None:
        self.state = state
        self.reason = reason
        if self._on_state is not None:
            self._on_state(state, reason)


class _HealthObserver:
    """Pass batcher events to the metrics, and batch outcomes to the runtime health."""

    def __init__(self, metrics: BatcherMetrics, health: RuntimeHealth, engine: Engine) -> None:
        self._metrics = metrics
        self._health = health
        self._engine = engine

    def queue_depth(self, depth: int) -> None:
        self._metrics.queue_depth(depth)

    def queue_wait(self, seconds: float) -> None:
        self._metrics.queue_wait(seconds)

    def batch_dispatched(self, size: int) -> None:
        self._metrics.batch_dispatched(size)

    def batch_done(self, size: int, seconds: float, ok: bool) -> None:
        self._metrics.batch_done(size, seconds, ok)
        if ok:
            self._health.batch_ok()

    def dropped(self, reason: str) -> None:
        self._metrics.dropped(reason)
