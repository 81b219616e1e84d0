"""The seam between a front end and an engine: admit, check, decode, then submit to the engine.

A front end asks everything of its engine through one small interface (`EngineClient`): the
engine is in this process (`--engine inline`: `service.engine.core.Engine`) or in an engine
process behind the corridor (`--engine process`: `service.engine.client.ProcessEngine`).
Neither this module nor the routes import torch or ONNX Runtime; only an inline engine does,
when it loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from service import imaging
from service.admission import Admission, Ledger, Ticket
from service.batching import BatchResult, QueueFull
from service.card import ModelCard
from service.engine.state import EVERYTHING, EngineState, Want
from service.errors import ApiError, NotReady
from service.imaging.device import DEVICE_FORMATS
from service.metrics import Metrics
from service.runtime.threads import lower_priority
from service.settings import Settings

if TYPE_CHECKING:
    from service.decode_batcher import DecodeBatcher
    from service.engine.client import InputSlot

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "draining", "failed", "stopped"]


class EngineClient(Protocol):
    """What a front end asks of an engine, wherever the engine runs (the only door)."""

    state: EngineState
    reason: str
    card: ModelCard | None
    batch_cap: int
    capacity: int

    @property
    def backend_name(self) -> str: ...

    devices: list[str]
    providers: list[str]
    abandoned_threads: bool

    @property
    def broken(self) -> bool: ...
    @property
    def model_device(self) -> str: ...
    @property
    def drain_rate(self) -> float | None: ...
    @property
    def jpeg_device(self) -> str | None: ...

    def info(self) -> dict[str, Any]: ...
    def backlog_seconds(self, images: int) -> float | None: ...
    async def load(self) -> None: ...
    async def reserve(self) -> InputSlot | None: ...
    async def reserve_jpeg(self, size: int) -> InputSlot | None: ...
    async def submit(
        self, item: Any, deadline: float | None, want: Want | None = None
    ) -> BatchResult: ...
    async def drain(self, deadline: float) -> None: ...
    async def close(self, deadline: float) -> None: ...


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
    """Admit, decode and submit one served model's inputs to its engine; track readiness.

    `engine` is the door to the engine; by default it is built at load from the settings
    (`--engine inline` or `process`). `decode_on` overrides where the tensor decoder runs (tests
    use "cpu" to exercise the device path without a GPU); by default it follows
    `settings.decode_device`.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        decode_on: str | None = None,
        on_broken: Callable[[BaseException], None] | None = None,
        engine: EngineClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._state: State = "loading"
        self._reason = "loading the model"
        self.engine = engine
        self.decode_device = "cpu"
        self.device_decoder: str | None = None  # the JPEG library when decode is on a device
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
        self._on_broken = on_broken
        self._drain_by: float | None = None  # set when shutdown begins

    # What the engine knows, as the routes read it.
    @property
    def card(self) -> ModelCard | None:
        return self.engine.card if self.engine is not None else None

    @property
    def batch_cap(self) -> int:
        return self.engine.batch_cap if self.engine is not None else self.settings.max_batch_size

    @property
    def backend_name(self) -> str:
        return self.engine.backend_name if self.engine is not None else self.settings.backend

    @property
    def devices(self) -> list[str]:
        return self.engine.devices if self.engine is not None else []

    @property
    def providers(self) -> list[str]:
        return self.engine.providers if self.engine is not None else []

    def engine_info(self) -> dict[str, Any]:
        """Return what the engine says of its runtime (empty before it is reached)."""
        engine = self.engine
        return engine.info() if engine is not None and engine.card is not None else {}

    @property
    def pool(self) -> Any:
        """The inline engine's runtime pool (None behind a corridor or before loading)."""
        return getattr(self.engine, "pool", None)

    @property
    def batcher(self) -> Any:
        """The inline engine's batcher (None behind a corridor or before loading)."""
        return getattr(self.engine, "batcher", None)

    @property
    def abandoned_threads(self) -> bool:
        return self.engine is not None and self.engine.abandoned_threads

    @property
    def state(self) -> State:
        """Return this front end's state; while it is ready, an engine that is not shows."""
        engine = self.engine
        if self._state == "ready" and engine is not None and engine.state != "ready":
            return "failed" if engine.state in ("failed", "stopped") else engine.state
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state

    @property
    def reason(self) -> str:
        engine = self.engine
        if self._state == "ready" and engine is not None and engine.state != "ready":
            return engine.reason
        return self._reason

    @reason.setter
    def reason(self, reason: str) -> None:
        self._reason = reason

    @property
    def broken(self) -> bool:
        """Return whether the runtime is broken for good (liveness fails, restart the pod)."""
        return self.engine is not None and self.engine.broken

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _make_engine(self) -> EngineClient:
        if self.settings.engine == "process":
            from service.engine.client import ProcessEngine

            return ProcessEngine(self.settings, on_state=self._engine_state)
        from service.engine.core import Engine

        return Engine(
            self.settings, self.metrics, on_state=self._engine_state, on_broken=self._broken
        )

    async def load(self) -> None:
        """Load (or reach) the engine, then start admitting; failures flip readiness."""
        started = time.perf_counter()
        if self.engine is None:
            self.engine = self._make_engine()
        engine = self.engine
        try:
            await engine.load()
            card = engine.card
            assert card is not None
            # Pillow imports its plugins on the first decode (40-80 ms holding the GIL and the
            # import lock): here, rather than inside the first burst of requests.
            await asyncio.get_running_loop().run_in_executor(self._decoder, imaging.register_codecs)
            self._device_decoder = await asyncio.to_thread(
                self._start_device_decoder, card.preprocessing, engine.model_device
            )
            ledger: Ledger | None = getattr(engine, "ledger", None)
            self.admission = Admission(
                engine.capacity,
                on_change=self.metrics.admitted.set,
                max_wait_s=self.settings.request_timeout_s,
                backlog_seconds=engine.backlog_seconds,
                ledger=ledger,
                drain_rate=(lambda: engine.drain_rate) if ledger is not None else None,
            )
        except Exception as exc:
            self.fail(exc)
            raise
        info = engine.info()
        self.metrics.model_info.info(
            {
                "name": card.name,
                "variant": card.variant,
                "backend": info["backend"],
                "provider": info["provider"],
                "precision": info["precision"],
                "decode_device": self.decode_device,
                "weights": card.weights_source,
            }
        )
        log.info(
            "ready: %s on %s x%d (%s engine) in %.1f s", card.name, engine.backend_name,
            info["instances"], self.settings.engine, time.perf_counter() - started,
        )  # fmt: skip
        if self._state == "loading":  # not if shutdown began while the model loaded
            self._set_state("ready", "ok")

    def fail(self, exc: BaseException) -> None:
        """Mark the service not ready after a load failure (the engine logged what broke)."""
        engine = self.engine
        if engine is not None and engine.state == "failed":
            self._set_state("failed", engine.reason)
            return
        from service.engine.errors import describe_failure

        reason = describe_failure(exc)
        log.error("cannot serve: %s", reason)
        self._set_state("failed", reason)

    def _engine_state(self, state: EngineState, reason: str) -> None:
        """Follow the engine: readiness (and the ready gauge) reflects it at once."""
        self.metrics.ready.set(1 if self.state == "ready" else 0)

    def _broken(self, exc: BaseException) -> None:
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
            if self._state != "failed":
                self._set_state("draining", "shutting down")
        if self.engine is not None:
            await self.engine.drain(self._drain_by)

    async def close(self) -> None:
        """Drain (if shutdown has not already), then release the engine."""
        await self.drain()
        assert self._drain_by is not None
        if self.engine is not None:
            await self.engine.close(self._drain_by)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        if self._device_decoder is not None:
            self._device_decoder.close()
        if self._state == "draining":
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
        self,
        data: bytes,
        endpoint: str,
        deadline: float,
        *,
        ticket: Ticket,
        want: Want = EVERYTHING,
    ) -> Outcome:
        """Decode, preprocess, batch and run one image; raises domain errors for bad input.

        The caller admits the request's images before any is decoded (`admit(n)`, in the
        request's own task) and passes the ticket to each call, which releases one image.
        """
        completed = False
        queued = [False]  # set once the image reaches the batcher
        try:
            outcome = await self._predict(data, endpoint, deadline, queued, want)
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
        self, data: bytes, endpoint: str, deadline: float, queued: list[bool], want: Want
    ) -> Outcome:
        engine = self.engine
        if not self.ready or engine is None or self.card is None:
            raise NotReady(self.reason)
        self.metrics.image_bytes.observe(len(data))
        if engine.jpeg_device is not None:  # an engine that decodes JPEGs on its device
            header = await asyncio.get_running_loop().run_in_executor(
                self._decoder,
                partial(imaging.read_header, data, max_pixels=self.settings.max_image_pixels),
            )
            if header.format in DEVICE_FORMATS:
                encoded = await engine.reserve_jpeg(len(data))
                if encoded is not None:  # else too large for a slot: decoded here
                    return await self._run_encoded(data, header, encoded, endpoint, deadline,
                                                   queued, want)  # fmt: skip
        # Behind a corridor, the crop is decoded straight into a shared-memory slot.
        slot = await engine.reserve()
        try:
            prepared = await self._prepare(data, self.card.preprocessing, slot)
            stage = self.metrics.stage
            stage(endpoint, "decode").observe(prepared.decode_seconds)
            stage(endpoint, "preprocess").observe(prepared.preprocess_seconds)
            self.metrics.image_pixels.observe(prepared.width * prepared.height)
            queued[0] = True
            result = await engine.submit(slot or prepared.pixels, deadline, want)
        finally:
            if slot is not None and slot.held:
                slot.release()
        stage(endpoint, "queue").observe(result.queue_seconds)
        stage(endpoint, "inference").observe(result.infer_seconds)
        return Outcome(
            result,
            prepared.decode_seconds,
            prepared.preprocess_seconds,
            prepared.width,
            prepared.height,
        )

    async def _run_encoded(
        self,
        data: bytes,
        header: imaging.Header,
        slot: InputSlot,
        endpoint: str,
        deadline: float,
        queued: list[bool],
        want: Want,
    ) -> Outcome:
        """Hand a JPEG to the engine undecoded: it decodes, crops and runs it on its device."""
        engine = self.engine
        assert engine is not None
        try:
            slot.fill(data)
            queued[0] = True  # the engine counts a caller who leaves from here on
            result = await engine.submit(slot, deadline, want)
        finally:
            slot.release()
        stage = self.metrics.stage
        stage(endpoint, "decode").observe(slot.decode_seconds)
        stage(endpoint, "preprocess").observe(slot.preprocess_seconds)
        self.metrics.image_pixels.observe(header.width * header.height)
        stage(endpoint, "queue").observe(result.queue_seconds)
        stage(endpoint, "inference").observe(result.infer_seconds)
        return Outcome(
            result, slot.decode_seconds, slot.preprocess_seconds, header.width, header.height
        )

    async def predict_pixels(
        self, pixels: np.ndarray, endpoint: str, deadline: float, want: Want = EVERYTHING
    ) -> list[Outcome]:
        """Batch and run already-preprocessed float32 `[B, 3, H, W]` pixels, all or none."""
        engine = self.engine
        if not self.ready or engine is None or self.card is None:
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
        stage = self.metrics.stage
        ticket = self.admit(len(pixels))  # admitted or refused (429) whole

        async def one(item: np.ndarray) -> Outcome:
            completed = False
            try:
                result = await engine.submit(np.ascontiguousarray(item), deadline, want)
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

    async def _prepare(
        self, data: bytes, pp: imaging.Preprocessing, slot: InputSlot | None = None
    ) -> _Prepared:
        """Check the header on the CPU, then decode JPEGs on the device and the rest here.

        With a `slot`, the CPU decoder writes the crop into it; a caller that leaves meanwhile
        releases the slot only once the decode thread is done with it.
        """
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
        out = None if slot is None else slot.array
        work = self._decoder.submit(self._decode, data, pp, out)
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            if slot is not None and not work.cancel() and not work.done():
                slot.held = False  # not to be given back until the thread stops writing it
                work.add_done_callback(partial(_give_back_later, loop, slot))
            raise

    def _decode(
        self, data: bytes, pp: imaging.Preprocessing, out: np.ndarray | None = None
    ) -> _Prepared:
        started = time.perf_counter()
        decoded = imaging.decode_image(
            data,
            max_pixels=self.settings.max_image_pixels,
            draft_size=imaging.draft_size(pp) if self.settings.jpeg_draft else None,
        )
        decoded_at = time.perf_counter()
        pixels = imaging.crop(decoded.image, pp, out=out)
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
        if self._decode_on is None and self.settings.engine == "process":
            # Device decode belongs to the engine: JPEGs cross the corridor undecoded, if it
            # decodes them; other formats (and JPEGs too large for a slot) decode here.
            engine = self.engine
            where = engine.jpeg_device if engine is not None else None
            self.decode_device = where or "cpu"
            self.device_decoder = engine.info().get("jpeg_decoder") if where and engine else None
            return None
        from service.decode_batcher import start_device_decoder

        batcher = start_device_decoder(self.settings, pp, model_device, self._decode_on)
        if batcher is not None:
            self.decode_device = batcher.decoder.device
            self.device_decoder = batcher.decoder.decoder_name
        return batcher

    def _set_state(self, state: State, reason: str) -> None:
        self._state = state
        self._reason = reason
        self.metrics.ready.set(1 if self.state == "ready" else 0)


def _give_back_later(loop: asyncio.AbstractEventLoop, slot: InputSlot, _: object) -> None:
    """Give a slot back, on the loop's thread, once the decode thread writing it has finished."""
    with contextlib.suppress(RuntimeError):  # the loop closed while shutting down
        loop.call_soon_threadsafe(slot.pool.give, slot.slot)
