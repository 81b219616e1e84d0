"""The engine's end of one front end's corridor: SUBMIT in, RESULT out, outputs in the slot.

Each SUBMIT is queued in the engine's batcher with a callback that writes the outputs into the
input's slot and puts the RESULT frame: no task per input. A JPEG (the JPEGS pool, with device
decode) goes through the device decoder first; if the decoder refuses it, its error goes back
in the slot (BAD_IMAGE) for the front end to raise again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from functools import partial
from typing import NamedTuple

import numpy as np

from service.batching import BatcherClosed, BatchResult, DeadlineExceeded, QueueFull
from service.decode_batcher import DecodeBatcher
from service.engine import wire
from service.engine.core import Engine
from service.engine.shm import Board, Slots
from service.engine.state import Want
from service.errors import NotReady
from service.imaging.errors import ImageError
from service.postprocess import BatchOutputs

log = logging.getLogger(__name__)


class Decoded(NamedTuple):
    """A JPEG input's outputs, with the time its decode batch took."""

    result: BatchResult
    decode_seconds: float
    preprocess_seconds: float


class Link(wire.FrameProtocol):
    """One front end's connection: its slots, its inputs in the engine, its board cell.

    Each SUBMIT is queued in the batcher with a callback that writes the outputs and the
    RESULT: no task per input (a task costs its creation, its name and a loop turn). A JPEG
    is the exception: a task decodes it, then queues the crop.
    """

    def __init__(
        self,
        engine: Engine,
        board: Board,
        cell: int,
        pools: dict[int, Slots],
        pid: int,
        decoder: DecodeBatcher | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.decoder = decoder
        self.board = board
        self.cell = cell
        self.pools = pools
        self.pid = pid
        self.inputs: dict[int, asyncio.Future[BatchResult | Decoded]] = {}  # by request id
        self.open = True
        self.gone = self.loop.create_future()  # set once it is forgotten

    def connection_lost(self, exc: Exception | None) -> None:
        """The front end went: drop its work, then clear its cell."""
        self.open = False
        task = self.loop.create_task(self._forget())
        task.add_done_callback(self._forgotten)

    def _forgotten(self, _: asyncio.Task[None]) -> None:
        if not self.gone.done():
            self.gone.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def frame(self, frames: bytes, offset: int) -> None:
        if frames[offset] == wire.SUBMIT:  # inline: the one frame of every input
            _, request, pool, slot, top_k, want, deadline, length = wire.SUBMIT_FRAME.unpack_from(
                frames, offset
            )
            slots = self.pools.get(pool)
            if slots is None or not 0 <= slot < slots.count:
                self._answer(request, wire.INVALID)
                return
            future: asyncio.Future[BatchResult | Decoded]
            if pool == wire.JPEGS:
                if self.decoder is None or not 0 < length <= slots.layout.input_bytes:
                    self._answer(request, wire.INVALID)
                    return
                data = bytes(slots.inputs[slot, :length])  # its input area holds errors next
                run = self._decode_then_run(data, deadline or None, _want(top_k, want))
                future = self.loop.create_task(run)
            else:
                try:
                    future = self.engine.enqueue(  # type: ignore[assignment]
                        slots.inputs[slot], deadline or None, _want(top_k, want)
                    )
                except Exception as exc:
                    self._answer(request, _status(exc))
                    return
            self.inputs[request] = future
            future.add_done_callback(partial(self._ran, request, slots, slot, top_k, want))
        elif frames[offset] == wire.CANCEL:
            cancelled = self.inputs.get(wire.parse_cancel(frames, offset))
            if cancelled is not None:
                cancelled.cancel()  # withdrawn from the batcher unless the model has it
        else:
            log.error(
                "front end pid %d sent an unknown frame %d; closing it", self.pid, frames[offset]
            )
            self.close()

    async def _decode_then_run(self, data: bytes, deadline: float | None, want: Want) -> Decoded:
        """Decode and crop one JPEG on the device (batched with others), then queue the crop."""
        assert self.decoder is not None
        try:
            async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
                crop = await self.decoder.decode(data)
        except asyncio.CancelledError:
            # Its caller left before the crop was queued: the batcher never saw it.
            self.engine.metrics.dropped.labels(reason="cancelled").inc()
            raise
        except TimeoutError:
            self.engine.metrics.dropped.labels(reason="deadline").inc()
            raise DeadlineExceeded("deadline passed while the image was decoded") from None
        result = await self.engine.enqueue(crop.pixels, deadline, want)
        return Decoded(result, crop.decode_seconds, crop.preprocess_seconds)

    def _ran(
        self,
        request: int,
        slots: Slots,
        slot: int,
        top_k: int,
        want: int,
        future: asyncio.Future[BatchResult | Decoded],
    ) -> None:
        """Write a settled input's outputs into its slot and answer its SUBMIT."""
        self.inputs.pop(request, None)
        if future.cancelled():
            self._answer(request, wire.CANCELLED)
            return
        exc = future.exception()
        if isinstance(exc, ImageError):
            self._refuse(request, slots, slot, exc)
            return
        if exc is not None:
            self._answer(request, _status(exc))
            return
        result = future.result()
        decode_s = preprocess_s = 0.0
        if isinstance(result, Decoded):
            result, decode_s, preprocess_s = result
        try:
            k = _write_outputs(slots, slot, result, top_k, want)
        except Exception:
            log.exception("writing the outputs of request %d failed", request)
            self._answer(request, wire.FAILED)
            return
        self.engine.completed(1)
        self._answer(
            request, wire.OK, result.batch_size, k, result.queue_seconds, result.infer_seconds,
            decode_s, preprocess_s,
        )  # fmt: skip

    def _refuse(self, request: int, slots: Slots, slot: int, exc: ImageError) -> None:
        """Answer a JPEG the decoder refused with its error, written where its bytes were."""
        area = slots.inputs[slot]
        try:
            error = wire.bad_image(type(exc).__name__, str(exc), area.nbytes)
        except ValueError:  # no room even for its name (a slot below MIN_JPEG_SLOT_BYTES)
            self._answer(request, wire.FAILED)
            return
        area[: len(error)] = np.frombuffer(error, np.uint8)
        self._answer(request, wire.BAD_IMAGE, k=len(error))

    def _answer(
        self,
        request: int,
        status: int,
        batch_size: int = 0,
        k: int = 0,
        queue_s: float = 0.0,
        infer_s: float = 0.0,
        decode_s: float = 0.0,
        preprocess_s: float = 0.0,
    ) -> None:
        if self.open and self.outbox is not None:
            self.outbox.put(wire.RESULT_FRAME.pack(
                wire.RESULT, request, status, batch_size, k, queue_s, infer_s, decode_s,
                preprocess_s,
            ))  # fmt: skip

    async def _forget(self) -> None:
        inputs = list(self.inputs.values())
        for future in inputs:
            future.cancel()
        # Their callbacks run on the next loop turns; the model may still hold some of them.
        while self.inputs:
            await asyncio.wait(list(self.inputs.values()))
            await asyncio.sleep(0)
        self.board.clear(self.cell)
        log.info("front end pid %d disconnected (%d inputs dropped)", self.pid, len(inputs))


@functools.lru_cache(maxsize=1024)
def _want(top_k: int, bits: int) -> Want:
    """Return the Want a SUBMIT's fields spell (a handful of distinct ones: made once each)."""
    return Want(
        top_k=top_k,
        embedding=bool(bits & wire.WANT_EMBEDDING),
        logits=bool(bits & wire.WANT_LOGITS),
    )


def _status(exc: BaseException) -> int:
    """Return the RESULT status that tells the front end which error ended an input."""
    if isinstance(exc, DeadlineExceeded):
        return wire.DEADLINE
    if isinstance(exc, BatcherClosed | NotReady):
        return wire.CLOSED
    if isinstance(exc, QueueFull):
        return wire.FULL
    if isinstance(exc, ValueError):  # an input of the wrong shape or kind
        return wire.INVALID
    return wire.FAILED  # the batcher has logged and counted the failure


def _write_outputs(slots: Slots, slot: int, result: BatchResult, top_k: int, want: int) -> int:
    """Write one input's requested outputs into its slot; return how many classes it holds."""
    room = slots.layout.max_k
    k = min(top_k, room)
    if k or want & wire.WANT_EMBEDDING:
        # Ranked and laid out once per batch (on the host or on the device): one copy here.
        outputs, row = result.outputs, result.row
        if outputs is None:
            outputs, row = BatchOutputs(result.logits[None, :], result.embedding[None]), 0
        slots.head[slot] = outputs.packed(k, room)[row]
    if want & wire.WANT_LOGITS:
        slots.logits[slot] = result.logits
    return k
