"""The engine process: one model owner fed by every front end over the corridor.

`python -m service.engine.process --socket PATH --settings JSON` loads the model, then listens
on a Unix socket. Each front end that connects gets the model card, the board (capacity, pace,
health) and a cell on it; it sends its slots' memory back. From then on it sends SUBMIT and
CANCEL frames and gets one RESULT per SUBMIT, the outputs written into the input's slot.
With device decode (--decode-device cuda, or auto with the model on a GPU) the engine also
takes JPEG bytes (the JPEGS pool), decodes and crops them in batches on its device, then
queues the crops like any other input.

A front end that goes away has its queued inputs dropped and its cell cleared once none of its
inputs is left in the engine. SIGTERM drains: queued and running work finishes within the drain
timeout; the process exits 0 (LOAD_FAILED if the model never loaded, RUNTIME_BROKEN if the
runtime broke, so the supervisor restarts it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import numpy as np

from service.batching import BatcherClosed, BatchResult, DeadlineExceeded, QueueFull
from service.decode_batcher import DecodeBatcher, start_device_decoder
from service.engine import wire
from service.engine.core import Engine
from service.engine.shm import MAX_FRONT_ENDS, Board, SlotLayout, Slots
from service.engine.state import Want
from service.errors import NotReady
from service.imaging.errors import ImageError
from service.metrics import Metrics
from service.postprocess import BatchOutputs
from service.settings import Settings

log = logging.getLogger(__name__)

LOAD_FAILED = 3
RUNTIME_BROKEN = 4
BEAT_S = 0.25  # how often the board's heartbeat and pace are refreshed
HANDSHAKE_TIMEOUT_S = 10.0


class _Decoded(NamedTuple):
    """A JPEG input's outputs, with the time its decode batch took."""

    result: BatchResult
    decode_seconds: float
    preprocess_seconds: float


class _Link(wire.FrameProtocol):
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
        self.inputs: dict[int, asyncio.Future[BatchResult | _Decoded]] = {}  # by request id
        self.open = True
        self.gone = asyncio.get_running_loop().create_future()  # set once it is forgotten

    def connection_lost(self, exc: Exception | None) -> None:
        """The front end went: drop its work, then clear its cell."""
        self.open = False
        task = asyncio.get_running_loop().create_task(self._forget())
        task.add_done_callback(self._forgotten)

    def _forgotten(self, _: asyncio.Task[None]) -> None:
        if not self.gone.done():
            self.gone.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def frame(self, frames: bytes, offset: int) -> None:
        kind = frames[offset]
        if kind == wire.SUBMIT:
            self._submit(*wire.parse_submit(frames, offset))
        elif kind == wire.CANCEL:
            cancelled = self.inputs.get(wire.parse_cancel(frames, offset))
            if cancelled is not None:
                cancelled.cancel()  # withdrawn from the batcher unless the model has it
        else:
            log.error("front end pid %d sent an unknown frame %d; closing it", self.pid, kind)
            self.close()

    def _submit(
        self,
        request: int,
        pool: int,
        slot: int,
        top_k: int,
        want: int,
        deadline: float,
        length: int,
    ) -> None:
        slots = self.pools.get(pool)
        if slots is None or not 0 <= slot < slots.count:
            self._answer(request, wire.INVALID)
            return
        future: asyncio.Future[BatchResult | _Decoded]
        if pool == wire.JPEGS:
            if self.decoder is None or not 0 < length <= slots.layout.input_bytes:
                self._answer(request, wire.INVALID)
                return
            data = bytes(slots.inputs[slot, :length])  # the slot's input area holds errors next
            run = self._decode_then_run(data, deadline or None, _want(top_k, want))
            future = asyncio.get_running_loop().create_task(run)
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

    async def _decode_then_run(self, data: bytes, deadline: float | None, want: Want) -> _Decoded:
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
        return _Decoded(result, crop.decode_seconds, crop.preprocess_seconds)

    def _ran(
        self,
        request: int,
        slots: Slots,
        slot: int,
        top_k: int,
        want: int,
        future: asyncio.Future[BatchResult | _Decoded],
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
        if isinstance(result, _Decoded):
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
            frame = wire.result(request, status, batch_size, k, queue_s, infer_s, decode_s,
                                preprocess_s)  # fmt: skip
            self.outbox.put(frame)

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
    k = min(top_k, slots.layout.max_k)
    if k:
        outputs = result.outputs or BatchOutputs(result.logits[None, :], result.embedding[None])
        # Ranked once per batch, on the host or on the device.
        indices, scores = outputs.best(result.row if result.outputs else 0, k)
        slots.indices[slot, :k] = indices
        slots.scores[slot, :k] = scores
    if want & wire.WANT_EMBEDDING:
        slots.embedding[slot] = result.embedding
    if want & wire.WANT_LOGITS:
        slots.logits[slot] = result.logits
    return k


class EngineServer:
    """Load the engine, then serve front ends on a Unix socket until stopped."""

    def __init__(
        self,
        settings: Settings,
        path: str,
        metrics: Metrics | None = None,
        *,
        decode_on: str | None = None,
    ) -> None:
        """`decode_on` puts the JPEG decoder on that device whatever --decode-device says
        (tests use "cpu" to run device decode without a GPU)."""
        self.settings = settings
        self.path = path
        self.metrics = metrics or Metrics(workers=settings.workers, shared=True)
        self.board = Board.create(generation=os.getpid())
        self.broken: BaseException | None = None
        self.engine = Engine(settings, self.metrics, on_state=self._state, on_broken=self._broken)
        self.decoder: DecodeBatcher | None = None  # set at load when JPEGs decode here
        self._decode_on = decode_on
        self.links: dict[int, _Link | None] = {}  # None: reserved during a handshake
        self._serving: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    def _state(self, state: str, reason: str) -> None:
        self.board.set_state(state)

    def _broken(self, exc: BaseException) -> None:
        self.broken = exc
        self._stop.set()

    def stop(self) -> None:
        """Begin draining (what SIGTERM does)."""
        self._stop.set()

    async def run(self, *, signals: bool = True) -> int:
        """Load, serve until stopped, drain; return the process's exit status."""
        loop = asyncio.get_running_loop()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        beat = loop.create_task(self._beat())
        try:
            await self.engine.load()
            card = self.engine.card
            assert card is not None
            self.decoder = await asyncio.to_thread(
                start_device_decoder, self.settings, card.preprocessing,
                self.engine.model_device, self._decode_on,
            )  # fmt: skip
        except Exception as exc:
            if self.engine.state == "ready":  # the model loaded; the JPEG decoder did not
                log.error("cannot start the JPEG decoder: %s", exc)
                await self.engine.close(time.monotonic())
            beat.cancel()
            return LOAD_FAILED
        self._publish()
        gc.collect()
        gc.freeze()  # torch's long-lived objects, never scanned again
        listener = _listen(self.path)
        accept = loop.create_task(self._accept(listener))
        log.info("engine ready on %s (capacity %d)", self.path, self.engine.capacity)
        await self._stop.wait()
        accept.cancel()
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # JPEGs still decoding are work accepted like queued inputs: let them reach the model.
        decoding = [task for link in self.links.values() if link is not None
                    for task in link.inputs.values() if isinstance(task, asyncio.Task)]  # fmt: skip
        if decoding:
            self.board.set_state("draining")  # front ends stop admitting meanwhile
            await asyncio.wait(decoding, timeout=max(deadline - time.monotonic(), 0.0))
        await self.engine.close(deadline)
        if self.decoder is not None:
            self.decoder.close()
        beat.cancel()
        for link in list(self.links.values()):
            if link is not None:
                link.close()
        if self.broken is not None:
            return RUNTIME_BROKEN
        return 0

    def _publish(self) -> None:
        engine = self.engine
        self.board.publish(
            capacity=engine.capacity,
            image_seconds=engine.image_seconds,
            drain_rate=engine.drain_rate,
        )

    async def _beat(self) -> None:
        while True:
            self.board.beat()
            if self.engine.batcher is not None:
                self._publish()
            await asyncio.sleep(BEAT_S)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            cell = next(i for i in range(MAX_FRONT_ENDS) if i not in self.links)
        except StopIteration:
            log.error("more than %d front ends; refusing one", MAX_FRONT_ENDS)
            conn.close()
            return
        self.links[cell] = None
        try:
            try:
                pid, pools = await asyncio.to_thread(self._handshake, conn, cell)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("a front end's handshake failed: %s", exc)
                conn.close()
                return
            conn.setblocking(False)
            link = _Link(self.engine, self.board, cell, pools, pid, self.decoder)
            await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=conn)
            self.links[cell] = link
            log.info("front end pid %d connected (cell %d)", pid, cell)
            await link.gone
        finally:
            self.links.pop(cell, None)

    def info(self) -> dict[str, object]:
        """Return the engine's info, with where it decodes JPEGs (None: front ends decode)."""
        decoder = self.decoder.decoder if self.decoder is not None else None
        return {
            **self.engine.info(),
            "jpeg_device": decoder.device if decoder is not None else None,
            "jpeg_decoder": decoder.decoder_name if decoder is not None else None,
        }

    def _handshake(self, conn: socket.socket, cell: int) -> tuple[int, dict[int, Slots]]:
        conn.settimeout(HANDSHAKE_TIMEOUT_S)
        card = self.engine.card
        assert card is not None
        hello = {
            "card": card.to_dict(),
            "info": self.info(),
            "cell": cell,
            "capacity": self.engine.capacity,
            "max_k": min(self.settings.max_top_k, card.num_classes),
        }
        wire.send_hello(conn, hello, [self.board.fd])
        attach, fds = wire.recv_hello(conn)
        pools: dict[int, Slots] = {}
        for fd, spec in zip(fds, attach["pools"], strict=True):
            layout = SlotLayout.from_dict(spec["layout"])
            pools[spec["pool"]] = Slots.attach(fd, layout, spec["count"])
            os.close(fd)  # the mapping keeps the memory
        return int(attach["pid"]), pools


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(MAX_FRONT_ENDS)
    sock.setblocking(False)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """Run an engine process until SIGTERM; see the module docstring for the exit status."""
    parser = argparse.ArgumentParser(prog="hiera-serve engine")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--settings", required=True, help="Settings as JSON")
    args = parser.parse_args(argv)
    settings = Settings.model_validate_json(args.settings)
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    from service.workers import exit_with_parent

    exit_with_parent(os.getppid())
    server = EngineServer(settings, args.socket)
    try:
        import uvloop

        status = uvloop.run(server.run())
    except ImportError:
        status = asyncio.run(server.run())
    if server.engine.abandoned_threads or status == RUNTIME_BROKEN:
        logging.shutdown()
        os._exit(status)
    return status


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
