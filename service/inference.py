"""The serving core without HTTP: load the model, decode images, batch, and track readiness."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np

from model.artifacts import RepositoryError
from model.checkpoints import CheckpointError
from model.export import ExportError
from model.hiera import WeightsUnavailable
from model.variants import UnknownVariant
from service import imaging
from service.admission import Admission, Ticket
from service.batching import BatchResult, DynamicBatcher, QueueFull
from service.decode_batcher import DecodeBatcher
from service.errors import ApiError, NotReady
from service.imaging.device import DEVICE_FORMATS
from service.metrics import BatcherMetrics, Metrics
from service.runtime.base import BackendError
from service.runtime.devices import cuda_uuids
from service.runtime.loader import ModelCard, plan
from service.runtime.pool import InputSpec, RuntimePool
from service.runtime.threads import lower_priority
from service.runtime_health import RuntimeBroken, RuntimeHealth
from service.settings import Settings

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "draining", "failed", "stopped"]

# Errors that come from what the operator asked for (paths, weights, devices), not from bugs.
_CONFIGURATION_ERRORS = (
    RepositoryError,
    CheckpointError,
    WeightsUnavailable,
    BackendError,
    ExportError,
    UnknownVariant,
)


@dataclass(frozen=True)
class Outcome:
    """One image's model outputs with where its time went."""

    result: BatchResult
    decode_seconds: float
    preprocess_seconds: float
    width: int
    height: int


@dataclass(frozen=True)
class _Prepared:
    """An upload turned into a model input (a uint8 crop), on the host or on the device."""

    pixels: object
    decode_seconds: float
    preprocess_seconds: float
    width: int
    height: int


class InferenceService:
    """Own the runtime pool, the batcher and the decoders for one served model.

    `decode_on` overrides where the tensor decoder runs (tests use "cpu" to exercise the device
    path without a GPU); by default it follows `settings.decode_device`.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        decode_on: str | None = None,
        on_broken: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state: State = "loading"
        self.reason = "loading the model"
        self.card: ModelCard | None = None
        self.pool: RuntimePool | None = None
        self.batch_cap = settings.max_batch_size  # lowered after warm-up if batching buys nothing
        self.batcher: DynamicBatcher | None = None
        self.backend_name = settings.backend
        self.devices: list[str] = []
        self.providers: list[str] = []
        self.decode_device = "cpu"
        self._decode_on = decode_on
        self._decoder = ThreadPoolExecutor(
            settings.decode_threads,
            "hiera-decode",
            initializer=lower_priority,
            initargs=(settings.thread_niceness,),
        )
        self._device_decoder: DecodeBatcher | None = None
        self.loaded = asyncio.Event()  # set when loading ends, successfully or not
        self.admission: Admission | None = None
        self.health = RuntimeHealth(
            max_consecutive_failures=settings.max_consecutive_failures,
            batch_timeout_s=settings.batch_timeout_s,
            on_broken=self._runtime_broken,
        )
        self._on_broken = on_broken
        # True once shutdown had to leave a hung model thread behind: the process must then
        # exit without joining it.
        self.abandoned_threads = False
        self._drain_by: float | None = None  # set when shutdown begins

    @property
    def broken(self) -> bool:
        """Return whether the runtime is broken for good (liveness fails, restart the pod)."""
        return self.health.broken is not None or (self.state == "failed" and self.card is not None)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def load(self) -> None:
        """Plan, build and warm every instance, then start batching; failures flip readiness."""
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
            # Pillow imports its plugins on the first decode (40-80 ms holding the GIL and the
            # import lock): here, rather than inside the first burst of requests.
            await asyncio.get_running_loop().run_in_executor(self._decoder, imaging.register_codecs)
            self._device_decoder = await asyncio.to_thread(
                self._start_device_decoder, pp, self.pool.instances[0].device
            )
            # Everything admitted counts: images decoding, queued, and one capped batch per
            # instance running, so decode work never piles up beyond what the queue holds.
            capacity = self.settings.max_queue_size + self.pool.size * self.batch_cap
            self.batcher = DynamicBatcher(
                self.pool.infer,
                collate=list,  # the pool's feeders assemble batches on their own devices
                max_batch_size=self.batch_cap,
                max_delay_ms=self.settings.max_delay_ms,
                # Room for everything admission lets in (queue + one capped batch per instance):
                # admission is the limit. A tighter bound here raced the batcher's own loop (an
                # item not yet popped into its batch still counted as queued) and refused
                # admitted requests after decoding them.
                max_queue_size=capacity,
                concurrency=self.pool.size,
                observer=_HealthObserver(BatcherMetrics(self.metrics), self.health),
                on_error=self._runtime_broken,
                on_batch_error=self._batch_failed,
                wait_when_idle=self.settings.batch_wait_when_idle,
            )
            self.admission = Admission(
                capacity,
                on_change=self.metrics.admitted.set,
                max_wait_s=self.settings.request_timeout_s,
                backlog_seconds=self.batcher.backlog_seconds,
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
        self.metrics.model_info.info(
            {
                "name": card.name,
                "variant": card.variant,
                "backend": self.backend_name,
                "provider": ",".join(sorted(set(self.providers))),
                "precision": self.settings.precision,
                "decode_device": self.decode_device,
                "weights": card.weights_source,
            }
        )
        if card.random_weights:
            log.warning(
                "SERVING RANDOM WEIGHTS: %s was randomly initialised; predictions are noise",
                card.name,
            )
        solo = " side by side + 1 on every core (adaptive layout)" if self.pool.solo else ""
        log.info(
            "ready: %s on %s x%d%s in %.1f s", card.name, self.backend_name, self.pool.size,
            solo, time.perf_counter() - started,
        )  # fmt: skip
        if self.state == "loading":  # not if shutdown began while the model loaded
            self._set_state("ready", "ok")

    def fail(self, exc: BaseException) -> None:
        """Mark the service not ready after a load failure, a backend error or a dead worker."""
        if isinstance(exc, _CONFIGURATION_ERRORS):
            # The message says what to fix; a traceback would only bury it.
            log.error("cannot serve: %s", exc)
        else:
            log.error("model failure, readiness is now false: %r", exc, exc_info=exc)
        self.metrics.runtime_errors.inc()
        # RuntimeBroken's message is ours and says what tripped; others may hold internals.
        reason = str(exc) if isinstance(exc, RuntimeBroken) else None
        self._set_state("failed", reason or f"{type(exc).__name__} in the model runtime")

    def _batch_failed(self, exc: BaseException) -> None:
        self.metrics.batch_failures.inc()
        self.health.batch_failed(exc)

    def _runtime_broken(self, exc: BaseException) -> None:
        self.fail(exc)
        self.metrics.runtime_broken.set(1)
        if self._on_broken is not None:
            self._on_broken(exc)

    async def drain(self) -> None:
        """Stop admitting; finish queued and running work within the drain timeout, 503 the rest.

        The server calls it as soon as shutdown begins, while connections are still open, so
        every waiting client gets its answer (a result, or 503 `shutting_down`) within the
        drain timeout even when a batch hangs. Calling it again waits within the same deadline.
        """
        if self._drain_by is None:
            self._drain_by = time.monotonic() + self.settings.drain_timeout_s
            if self.state != "failed":
                self._set_state("draining", "shutting down")
        await self.health.stop()
        if self.batcher is not None:
            left = max(self._drain_by - time.monotonic(), 0.0)
            await self.batcher.close(drain=True, timeout=left)

    async def close(self) -> None:
        """Drain (if shutdown has not already), then release the model."""
        await self.drain()
        assert self._drain_by is not None
        if self.pool is not None:
            # A hung backend call must not stretch shutdown past the drain timeout (plus a
            # moment for instances that are merely finishing).
            grace = max(self._drain_by - time.monotonic(), 0.0) + 0.5
            if not await self.pool.close(timeout=grace):
                self.abandoned_threads = True
        self._decoder.shutdown(wait=False, cancel_futures=True)
        if self._device_decoder is not None:
            self._device_decoder.close()
        if self.state == "draining":
            self._set_state("stopped", "stopped")

    def admit(self, count: int = 1) -> Ticket:
        """Admit `count` images now, before any is decoded, or raise QueueFull for all of them."""
        if not self.ready or self.admission is None:
            raise NotReady(self.reason)
        return self.admission.admit(count)

    def refusal(self) -> ApiError | QueueFull | None:
        """Return the error a request would get at admission now, or None if one would pass.

        A cheap look, for refusing at the door (service.refusal_gate); the route still admits
        for real, so a request that slips past here between two looks is refused there.
        """
        if not self.ready or self.admission is None:
            return NotReady(self.reason)
        return self.admission.refusal(1)

    async def predict(
        self, data: bytes, endpoint: str, deadline: float, *, ticket: Ticket
    ) -> Outcome:
        """Decode, preprocess, batch and run one image; raises domain errors for bad input.

        The caller admits the request's images before any is decoded (`admit(n)`, in the
        request's own task) and passes the ticket to each call, which releases one image.
        """
        completed = False
        queued = [False]  # set once the image reaches the batcher
        try:
            outcome = await self._predict(data, endpoint, deadline, queued)
            completed = True
            return outcome
        except asyncio.CancelledError:
            # The batcher counts callers that leave while queued; here, those that leave
            # while their image waits for (or is in) decode.
            if not queued[0]:
                self.metrics.dropped.labels(reason="cancelled").inc()
            raise
        finally:
            ticket.release(1, completed=completed)

    async def _predict(
        self, data: bytes, endpoint: str, deadline: float, queued: list[bool]
    ) -> Outcome:
        if not self.ready or self.batcher is None or self.card is None:
            raise NotReady(self.reason)
        self.metrics.image_bytes.observe(len(data))
        prepared = await self._prepare(data, self.card.preprocessing)
        stage = self.metrics.stage
        stage(endpoint, "decode").observe(prepared.decode_seconds)
        stage(endpoint, "preprocess").observe(prepared.preprocess_seconds)
        self.metrics.image_pixels.observe(prepared.width * prepared.height)
        queued[0] = True
        result = await self.batcher.submit(prepared.pixels, deadline=deadline)
        stage(endpoint, "queue").observe(result.queue_seconds)
        stage(endpoint, "inference").observe(result.infer_seconds)
        return Outcome(
            result,
            prepared.decode_seconds,
            prepared.preprocess_seconds,
            prepared.width,
            prepared.height,
        )

    async def predict_pixels(
        self, pixels: np.ndarray, endpoint: str, deadline: float
    ) -> list[Outcome]:
        """Batch and run already-preprocessed float32 `[B, 3, H, W]` pixels, all or none."""
        if not self.ready or self.batcher is None or self.card is None:
            raise NotReady(self.reason)
        height, width = self.card.preprocessing.input_size
        if pixels.dtype != np.float32 or pixels.ndim != 4 or pixels.shape[1:] != (3, height, width):
            raise ApiError(
                400, "invalid_tensor",
                f"pixels must be float32 [B, 3, {height}, {width}] (resized, cropped and "
                f"normalised like /v1/models' preprocessing), got {pixels.dtype} "
                f"{list(pixels.shape)}",
            )  # fmt: skip
        if not np.isfinite(pixels).all():
            raise ApiError(400, "invalid_tensor", "pixels contain NaN or infinite values")
        batcher, stage = self.batcher, self.metrics.stage
        ticket = self.admit(len(pixels))  # admitted or refused (429) whole

        async def one(item: np.ndarray) -> Outcome:
            completed = False
            try:
                result = await batcher.submit(np.ascontiguousarray(item), deadline=deadline)
                completed = True
            finally:
                ticket.release(1, completed=completed)
            stage(endpoint, "queue").observe(result.queue_seconds)
            stage(endpoint, "inference").observe(result.infer_seconds)
            return Outcome(result, 0.0, 0.0, width, height)

        tasks = [asyncio.ensure_future(one(item)) for item in pixels]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # after a failure, the others must not keep their queue slots
                task.cancel()
            ticket.release_all()

    async def _prepare(self, data: bytes, pp: imaging.Preprocessing) -> _Prepared:
        """Check the header on the CPU, then decode JPEGs on the device and the rest here."""
        loop = asyncio.get_running_loop()
        device = self._device_decoder
        if device is not None:
            header = await loop.run_in_executor(
                self._decoder,
                partial(imaging.read_header, data, max_pixels=self.settings.max_image_pixels),
            )
            if header.format in DEVICE_FORMATS:
                crop = await device.decode(data)
                return _Prepared(
                    crop.pixels,
                    crop.decode_seconds,
                    crop.preprocess_seconds,
                    header.width,
                    header.height,
                )
        return await loop.run_in_executor(self._decoder, self._decode, data, pp)

    def _decode(self, data: bytes, pp: imaging.Preprocessing) -> _Prepared:
        started = time.perf_counter()
        decoded = imaging.decode_image(
            data,
            max_pixels=self.settings.max_image_pixels,
            draft_size=imaging.draft_size(pp) if self.settings.jpeg_draft else None,
        )
        decoded_at = time.perf_counter()
        pixels = imaging.crop(decoded.image, pp)
        return _Prepared(
            pixels,
            decoded_at - started,
            time.perf_counter() - decoded_at,
            decoded.width,
            decoded.height,
        )

    def _start_device_decoder(
        self, pp: imaging.Preprocessing, model_device: str
    ) -> DecodeBatcher | None:
        """Build the tensor decoder where the model runs, if JPEGs are decoded on the device."""
        where = self._decode_on
        if where is None:
            wanted = self.settings.decode_device
            if wanted == "cuda" and model_device == "cpu":
                raise BackendError(
                    "--decode-device cuda, but the model runs on the CPU (no usable GPU); "
                    "use --decode-device cpu or auto"
                )
            on_gpu = model_device.startswith("cuda")
            where = model_device if wanted != "cpu" and on_gpu else None
        if where is None:
            self.decode_device = "cpu"
            return None
        from service.imaging.device import TensorDecoder

        decoder = TensorDecoder(pp, where, max_pixels=self.settings.max_image_pixels)
        self.decode_device = where
        log.info("JPEG decode: batched on %s; other formats on the CPU", where)
        return DecodeBatcher(decoder, max_batch_size=self.settings.max_batch_size)

    def _set_state(self, state: State, reason: str) -> None:
        self.state = state
        self.reason = reason
        self.metrics.ready.set(1 if state == "ready" else 0)


class _HealthObserver:
    """Pass batcher events to the metrics, and batch outcomes to the runtime health."""

    def __init__(self, metrics: BatcherMetrics, health: RuntimeHealth) -> None:
        self._metrics = metrics
        self._health = health

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
