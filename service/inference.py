"""The serving core without HTTP: load the model, decode images, batch, and track readiness."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.artifacts import RepositoryError
from model.checkpoints import CheckpointError
from model.export import ExportError
from model.hiera import WeightsUnavailable
from model.variants import UnknownVariant
from service import imaging
from service.batching import BatchResult, DynamicBatcher
from service.errors import ApiError, NotReady
from service.metrics import BatcherMetrics, Metrics
from service.runtime.base import BackendError
from service.runtime.loader import ModelCard, plan
from service.runtime.pool import RuntimePool
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


class InferenceService:
    """Own the runtime pool, the batcher and the decode threads for one served model."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state: State = "loading"
        self.reason = "loading the model"
        self.card: ModelCard | None = None
        self.pool: RuntimePool | None = None
        self.batcher: DynamicBatcher | None = None
        self.backend_name = settings.backend
        self.devices: list[str] = []
        self._decoder = ThreadPoolExecutor(settings.decode_threads, "hiera-decode")
        self.loaded = asyncio.Event()  # set when loading ends, successfully or not

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def load(self) -> None:
        """Plan, build and warm every instance, then start batching; failures flip readiness."""
        started = time.perf_counter()
        try:
            load_plan = await asyncio.to_thread(plan, self.settings)
            card = load_plan.card
            height, width = card.preprocessing.input_size
            self.pool = await RuntimePool.start(
                load_plan.instances,
                warmup_batch=np.zeros((3, height, width), np.float32),
                max_batch_size=self.settings.max_batch_size,
            )
            self.batcher = DynamicBatcher(
                self.pool.infer,
                max_batch_size=self.settings.max_batch_size,
                max_delay_ms=self.settings.max_delay_ms,
                max_queue_size=self.settings.max_queue_size,
                concurrency=self.pool.size,
                observer=BatcherMetrics(self.metrics),
                on_error=self.fail,
            )
            await self.batcher.start()
        except Exception as exc:
            self.fail(exc)
            raise
        self.card = card
        self.devices = [instance.device for instance in self.pool.instances]
        self.metrics.model_load.set(time.perf_counter() - started)
        self.metrics.model_info.info(
            {
                "name": card.name,
                "variant": card.variant,
                "backend": self.backend_name,
                "precision": self.settings.precision,
                "weights": card.weights_source,
            }
        )
        if card.random_weights:
            log.warning(
                "SERVING RANDOM WEIGHTS: %s was randomly initialised; predictions are noise",
                card.name,
            )
        log.info(
            "ready: %s on %s x%d in %.1f s", card.name, self.backend_name, self.pool.size,
            time.perf_counter() - started,
        )  # fmt: skip
        self._set_state("ready", "ok")

    def fail(self, exc: BaseException) -> None:
        """Mark the service not ready after a load failure, a backend error or a dead worker."""
        if isinstance(exc, _CONFIGURATION_ERRORS):
            # The message says what to fix; a traceback would only bury it.
            log.error("cannot serve: %s", exc)
        else:
            log.error("model failure, readiness is now false: %r", exc, exc_info=exc)
        self.metrics.runtime_errors.inc()
        self._set_state("failed", f"{type(exc).__name__} in the model runtime")

    async def close(self) -> None:
        """Stop accepting, finish queued work within the drain timeout, release the model."""
        if self.state != "failed":
            self._set_state("draining", "shutting down")
        if self.batcher is not None:
            await self.batcher.close(drain=True, timeout=self.settings.drain_timeout_s)
        if self.pool is not None:
            await self.pool.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        if self.state == "draining":
            self._set_state("stopped", "stopped")

    async def predict(self, data: bytes, endpoint: str, deadline: float) -> Outcome:
        """Decode, preprocess, batch and run one image; raises domain errors for bad input."""
        if not self.ready or self.batcher is None or self.card is None:
            raise NotReady(self.reason)
        self.metrics.image_bytes.observe(len(data))
        loop = asyncio.get_running_loop()
        tensor, decoded, decode_s, preprocess_s = await loop.run_in_executor(
            self._decoder, self._decode, data, self.card.preprocessing
        )
        stage = self.metrics.stage_duration
        stage.labels(endpoint, "decode").observe(decode_s)
        stage.labels(endpoint, "preprocess").observe(preprocess_s)
        self.metrics.image_pixels.observe(decoded.width * decoded.height)
        result = await self.batcher.submit(tensor, deadline=deadline)
        stage.labels(endpoint, "queue").observe(result.queue_seconds)
        stage.labels(endpoint, "inference").observe(result.infer_seconds)
        return Outcome(result, decode_s, preprocess_s, decoded.width, decoded.height)

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
        batcher, stage = self.batcher, self.metrics.stage_duration

        async def one(item: np.ndarray) -> Outcome:
            result = await batcher.submit(np.ascontiguousarray(item), deadline=deadline)
            stage.labels(endpoint, "queue").observe(result.queue_seconds)
            stage.labels(endpoint, "inference").observe(result.infer_seconds)
            return Outcome(result, 0.0, 0.0, width, height)

        tasks = [asyncio.ensure_future(one(item)) for item in pixels]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # after a failure, the others must not keep their queue slots
                task.cancel()

    def _decode(
        self, data: bytes, pp: imaging.Preprocessing
    ) -> tuple[np.ndarray, imaging.DecodedImage, float, float]:
        started = time.perf_counter()
        decoded = imaging.decode_image(
            data,
            max_pixels=self.settings.max_image_pixels,
            draft_size=imaging.draft_size(pp),
        )
        decoded_at = time.perf_counter()
        tensor = imaging.preprocess(decoded.image, pp)
        return tensor, decoded, decoded_at - started, time.perf_counter() - decoded_at

    def _set_state(self, state: State, reason: str) -> None:
        self.state = state
        self.reason = reason
        self.metrics.ready.set(1 if state == "ready" else 0)
