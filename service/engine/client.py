"""The door to an engine process: `ProcessEngine`, the corridor's front-end face.

It has the interface of the in-process engine (service.engine.core.Engine, through
service.inference.EngineClient), so the routes cannot tell them apart. Each input goes into one
of this front end's shared-memory slots (the one copy), a SUBMIT frame names the slot, and the
engine's RESULT frame says the outputs are in the slot beside it. When the engine decodes JPEGs
on its device (its hello says where), a JPEG upload goes into a slot of the JPEGS pool as bytes.

When the corridor closes (the engine died) or the engine's heartbeat stops (it hangs), every
waiting request fails at once with EngineUnavailable (503 + Retry-After) and the front end
reconnects in the background; readiness returns when the new engine is warm. A hung engine is
killed, so the supervisor restarts it. Nothing here imports torch or ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from service.batching import (
    BatcherClosed,
    BatchResult,
    DeadlineExceeded,
    InferenceFailed,
    QueueFull,
)
from service.card import ModelCard
from service.engine import wire
from service.engine.errors import EngineUnavailable
from service.engine.shm import Board, SlotLayout, Slots
from service.engine.state import EVERYTHING, EngineState, Want
from service.imaging import errors as image_errors
from service.postprocess import Prediction, normalize_rows
from service.settings import Settings

log = logging.getLogger(__name__)

RECONNECT_S = 0.1  # between attempts to reach an engine that is starting
HUNG_AFTER_S = 5.0  # a heartbeat older than this: the engine is hung, fail its requests
KILL_AFTER_S = 10.0  # ... and older than this: kill it, so the supervisor restarts it
HANDSHAKE_TIMEOUT_S = 5.0
TENSOR_SLOTS = 32  # float32 inputs (KServe FP32 tensors) are rare and four times larger
_WATCH_S = 0.25
_NOTHING = np.zeros(0, np.float32)  # an output the caller did not ask for; never written
_NOTHING.flags.writeable = False


class CorridorOutputs:
    """One input's outputs as the engine sent them: its top k, its embedding."""

    def __init__(
        self, indices: Sequence[int], scores: Sequence[float], embedding: np.ndarray
    ) -> None:
        self.indices = indices
        self.scores = scores
        self.embedding = embedding

    def top_k(self, row: int, labels: list[str], k: int) -> list[Prediction]:
        """Return the k best classes, best first (the engine ranked them as top_k() does)."""
        if k > len(self.indices):
            raise ValueError(f"asked for top {k}, the engine sent {len(self.indices)}")
        return [
            Prediction(i, labels[i], s)
            for i, s in zip(self.indices[:k], self.scores[:k], strict=True)
        ]

    @property
    def unit(self) -> np.ndarray:
        return normalize_rows(self.embedding[None, :])


class _Pool:
    """This front end's slots of one kind, handed out one input at a time."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self._free = list(range(slots.count - 1, -1, -1))  # a stack: warm slots are reused
        self._freed = asyncio.Event()
        self._waiting = 0  # callers waiting in take()

    def try_take(self) -> int | None:
        return self._free.pop() if self._free else None

    async def take(self) -> int:
        self._waiting += 1
        try:
            while not self._free:
                self._freed.clear()
                await self._freed.wait()
        finally:
            self._waiting -= 1
        return self._free.pop()

    def give(self, slot: int) -> None:
        self._free.append(slot)
        if self._waiting:
            self._freed.set()

    @property
    def free(self) -> int:
        return len(self._free)


class InputSlot:
    """A crop slot taken before decoding, so that the decoder writes the crop straight into
    shared memory (`array`) and the corridor copies nothing. Submitted, or released.

    In the JPEGS pool, `array` takes the upload's bytes (`fill`) and the engine decodes them;
    once answered, the slot says how long its decode and preprocessing took there.
    """

    __slots__ = ("array", "conn", "decode_seconds", "held", "kind", "length", "pool",
                 "preprocess_seconds", "slot")  # fmt: skip

    def __init__(self, conn: _Connection, pool: _Pool, slot: int, kind: int = wire.CROPS) -> None:
        self.conn = conn
        self.pool = pool
        self.slot = slot
        self.kind = kind
        self.array: np.ndarray = pool.slots.inputs[slot]
        self.held = True
        self.length = 0  # the bytes of an encoded image (JPEGS)
        self.decode_seconds = 0.0
        self.preprocess_seconds = 0.0

    def fill(self, data: bytes) -> None:
        """Copy an encoded image into the slot (the JPEGS pool)."""
        self.array[: len(data)] = np.frombuffer(data, np.uint8)
        self.length = len(data)

    def hand_over(self) -> int:
        """Pass the slot to its SUBMIT, which gives it back once answered."""
        self.held = False
        return self.slot

    def release(self) -> None:
        """Give the slot back unsubmitted (the decode failed, or its caller left)."""
        if self.held:
            self.held = False
            self.pool.give(self.slot)


# A RESULT frame unpacked: type, request id, status, batch size, k, seconds queued, in the
# model, decoding, preprocessing
Answer = tuple[int, int, int, int, int, float, float, float, float]


class _Connection(wire.FrameProtocol):
    """One corridor to one engine incarnation: RESULT frames resolve their callers' futures.

    Slots: while a request is in `waiting`, a caller that has left (its future cancelled) leaves
    the slot to the RESULT, which frees it; once the RESULT is handed over, the caller frees it.
    """

    def __init__(
        self,
        board: Board,
        pools: dict[int, _Pool],
        hello: dict[str, Any],
        on_closed: Callable[[_Connection], None],
    ) -> None:
        super().__init__()
        self.board = board
        self.pools = pools
        self.hello = hello
        self.waiting: dict[int, tuple[asyncio.Future[Answer], _Pool, int]] = {}
        self.dead: str | None = None  # why it can no longer be used
        self.closed = False  # the engine's end closed: that process is gone
        self.killed = False
        self._on_closed = on_closed

    def frame(self, frames: bytes, offset: int) -> None:
        result = wire.RESULT_FRAME.unpack_from(frames, offset)  # the whole frame, as it is
        waiter = self.waiting.pop(result[1], None)
        if waiter is None:
            return
        answer, pool, slot = waiter
        if answer.done():  # its caller left: the engine is done with the slot now
            pool.give(slot)
        else:
            answer.set_result(result)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_closed(self)


class ProcessEngine:
    """Reach the engine process at `settings.engine_socket`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_state: Callable[[EngineState, str], None] | None = None,
    ) -> None:
        if settings.engine_socket is None:
            raise ValueError("--engine process needs --engine-socket (the supervisor sets it)")
        self.settings = settings
        self.path = str(settings.engine_socket)
        self.state: EngineState = "loading"
        self.reason = "waiting for the engine process"
        self.card: ModelCard | None = None
        self.batch_cap = settings.max_batch_size
        self.capacity = 0
        self.backend_name: str = settings.backend
        self.devices: list[str] = []
        self.providers: list[str] = []
        self.abandoned_threads = False
        self._info: dict[str, Any] = {}
        self._on_state = on_state
        self._conn: _Connection | None = None
        self._next_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._mine = 0

    # The EngineClient interface.
    @property
    def broken(self) -> bool:
        return False  # a broken engine exits and is restarted; this front end stays alive

    @property
    def model_device(self) -> str:
        return self.devices[0] if self.devices else "cpu"

    # The ledger admission counts in (service.admission.Ledger): the board's cells, shared by
    # every front end. This front end's own count is kept here too, so that an engine restart
    # (a new board) starts from the images it still has admitted.
    @property
    def ledger(self) -> ProcessEngine:
        return self

    @property
    def outstanding(self) -> int:
        conn = self._conn
        return conn.board.outstanding if conn is not None else self._mine

    @property
    def mine(self) -> int:
        return self._mine

    def take(self, count: int, capacity: int) -> bool:
        conn = self._conn
        if conn is not None and not conn.board.take(count, capacity):
            return False
        self._mine += count
        return True

    def give(self, count: int) -> None:
        self._mine -= count
        conn = self._conn
        if conn is not None:
            conn.board.set_mine(self._mine)

    @property
    def drain_rate(self) -> float | None:
        conn = self._conn
        return conn.board.drain_rate if conn is not None else None

    def backlog_seconds(self, images: int) -> float | None:
        conn = self._conn
        return conn.board.backlog_seconds(images) if conn is not None else None

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    async def load(self) -> None:
        """Wait until the engine process answers and is ready, then keep the corridor open."""
        await self._connect()
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch()))

    @property
    def jpeg_device(self) -> str | None:
        """Where the engine decodes JPEGs (None: this front end decodes them)."""
        conn = self._conn
        if conn is None or wire.JPEGS not in conn.pools:  # or --jpeg-slot-bytes 0
            return None
        return conn.hello["info"].get("jpeg_device")

    async def reserve(self) -> InputSlot:
        """Take a crop slot for an image about to be decoded (see InputSlot)."""
        conn = self._conn
        if conn is not None and conn.dead is None and self.state == "ready":
            pool = conn.pools[wire.CROPS]
            slot = pool.try_take()
            if slot is not None:  # the usual case, without a second coroutine
                return InputSlot(conn, pool, slot, wire.CROPS)
        return await self._reserve(wire.CROPS)

    async def reserve_jpeg(self, size: int) -> InputSlot | None:
        """Take a JPEGS slot for an upload of `size` bytes, or None if the engine does not
        decode JPEGs or the upload is too large for a slot (then this front end decodes it)."""
        conn = self._ready()
        pool = conn.pools.get(wire.JPEGS)
        if pool is None or size > pool.slots.layout.input_bytes:
            return None
        return await self._reserve(wire.JPEGS)

    async def _reserve(self, kind: int) -> InputSlot:
        conn = self._ready()
        pool = conn.pools[kind]
        slot = pool.try_take()
        if slot is None:
            slot = await pool.take()
            if conn.dead is not None:
                pool.give(slot)
                raise EngineUnavailable(conn.dead)
        return InputSlot(conn, pool, slot, kind)

    def _ready(self) -> _Connection:
        conn = self._conn
        if conn is None or conn.dead is not None or self.state != "ready":
            raise EngineUnavailable(self.reason)
        return conn

    async def submit(
        self, item: Any, deadline: float | None, want: Want | None = None
    ) -> BatchResult:
        """Run one input: an array (copied into a slot) or an InputSlot already holding it."""
        if isinstance(item, InputSlot):
            if item.conn is not self._conn or item.conn.dead is not None:
                item.release()  # the engine it was taken from is gone
                raise EngineUnavailable(item.conn.dead or "the engine restarted meanwhile")
            conn, kind, pool, slot = item.conn, item.kind, item.pool, item.hand_over()
            length = item.length
        else:
            length = 0
            taken = await self._reserve(wire.CROPS if item.dtype == np.uint8 else wire.TENSORS)
            conn, kind, pool, slot = taken.conn, taken.kind, taken.pool, taken.hand_over()
            np.copyto(pool.slots.inputs[slot], item)  # the one copy
        assert conn.outbox is not None
        want = want or EVERYTHING
        request = self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        answer: asyncio.Future[Answer] = conn.loop.create_future()
        conn.waiting[request] = (answer, pool, slot)
        bits = (wire.WANT_EMBEDDING if want.embedding else 0) | (
            wire.WANT_LOGITS if want.logits else 0
        )
        top_k = min(want.top_k, pool.slots.layout.max_k)
        conn.outbox.put(wire.submit(request, kind, slot, top_k, bits, deadline or 0.0, length))
        try:
            # The engine answers every SUBMIT once, by its deadline, or the corridor closes
            # (then every waiting future fails): no timer of our own.
            _, _, status, batch_size, k, queue_s, infer_s, decode_s, preprocess_s = await answer
        except asyncio.CancelledError:
            if request in conn.waiting and conn.dead is None:
                conn.outbox.put(wire.cancel(request))  # its RESULT will free the slot
            else:
                conn.waiting.pop(request, None)
                pool.give(slot)
            raise
        except BaseException:
            pool.give(slot)  # the corridor closed: nobody reads the slot any more
            raise
        if isinstance(item, InputSlot):
            item.decode_seconds, item.preprocess_seconds = decode_s, preprocess_s
        try:
            return self._result(pool.slots, slot, status, batch_size, k, queue_s, infer_s, want)
        finally:
            pool.give(slot)

    def _result(
        self,
        slots: Slots,
        slot: int,
        status: int,
        batch_size: int,
        k: int,
        queue_s: float,
        infer_s: float,
        want: Want,
    ) -> BatchResult:
        if status == wire.BAD_IMAGE:  # the engine's decoder refused it; `k` bytes say why
            raise _image_error(slots.inputs[slot][:k])
        if status != wire.OK:
            raise _error(status)
        embedding = slots.embedding[slot].copy() if want.embedding else _NOTHING
        # The k indices and their scores in one unpack, as Python numbers, without numpy.
        ranked = _ranked(k, slots.layout.max_k).unpack_from(slots.buffer, slots.outputs_at(slot))
        outputs = CorridorOutputs(ranked[:k], ranked[k:], embedding)
        return BatchResult(
            logits=slots.logits[slot].copy() if want.logits else _NOTHING,
            embedding=embedding,
            batch_size=batch_size,
            queue_seconds=queue_s,
            infer_seconds=infer_s,
            outputs=outputs,  # type: ignore[arg-type]
            row=0,
        )

    async def drain(self, deadline: float) -> None:
        """Stop submitting; requests already sent finish in the engine (it drains after us)."""
        self._closing = True
        conn = self._conn
        if conn is None or not conn.waiting:
            return
        left = max(deadline - time.monotonic(), 0.0)
        await asyncio.wait([answer for answer, _, _ in conn.waiting.values()], timeout=left)

    async def close(self, deadline: float) -> None:
        await self.drain(deadline)
        for task in self._tasks:
            task.cancel()
        conn = self._conn
        if conn is not None:
            self._fail_all(conn, "the front end is shutting down")
            if conn.transport is not None:
                conn.transport.close()

    # The corridor.
    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, hello, board, pools = await asyncio.to_thread(self._handshake)
                break
            except (OSError, ValueError, KeyError) as exc:
                if self._closing:
                    raise EngineUnavailable("shutting down before the engine was reached") from None
                if not isinstance(exc, FileNotFoundError | ConnectionRefusedError):
                    # An engine that closed or stalled mid-handshake (it died or hangs).
                    log.warning("engine handshake on %s failed: %r; retrying", self.path, exc)
                await asyncio.sleep(RECONNECT_S)
        sock.setblocking(False)
        conn = _Connection(board, pools, hello, self._closed)
        await loop.create_unix_connection(lambda: conn, sock=sock)
        board.set_mine(self._mine)
        self._conn = conn
        self._info = hello["info"]
        self.card = ModelCard.from_dict(hello["card"])
        self.capacity = int(hello["capacity"])
        self.batch_cap = int(self._info["batch_cap"])
        self.backend_name = self._info["backend"]
        self.devices = list(self._info["devices"])
        self.providers = self._info["provider"].split(",")
        self._set_state("ready", "ok")
        log.info("engine reached on %s (pid %d)", self.path, int(hello.get("pid", 0)))

    def _handshake(self) -> tuple[socket.socket, dict[str, Any], Board, dict[int, _Pool]]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            sock.connect(self.path)
            hello, fds = wire.recv_hello(sock)
            board = Board.attach(fds[0], int(hello["cell"]))
            card = hello["card"]
            height, width = card["preprocessing"]["input_size"]
            capacity = int(hello["capacity"])
            specs: list[tuple[int, tuple[int, ...], str, int]] = [
                (wire.CROPS, (3, height, width), "uint8", capacity),
                (wire.TENSORS, (3, height, width), "float32", min(TENSOR_SLOTS, capacity)),
            ]
            jpeg_bytes = min(self.settings.jpeg_slot_bytes, self.settings.max_body_bytes)
            if hello["info"].get("jpeg_device") and jpeg_bytes > 0:
                # Every admitted image may be a JPEG: as many slots as crops.
                specs.append((wire.JPEGS, (jpeg_bytes,), "uint8", capacity))
            pools: dict[int, _Pool] = {}
            attach: list[dict[str, Any]] = []
            for kind, shape, dtype, count in specs:
                layout = SlotLayout(
                    shape, dtype, int(hello["max_k"]), int(card["embed_dim"]),
                    int(card["num_classes"]),
                )  # fmt: skip
                pools[kind] = _Pool(Slots.create(layout, count, f"hiera-slots-{kind}"))
                attach.append({"pool": kind, "count": count, "layout": layout.to_dict()})
            wire.send_hello(
                sock, {"pid": os.getpid(), "pools": attach}, [p.slots.fd for p in pools.values()]
            )
            for p in pools.values():
                os.close(p.slots.fd)  # the mapping keeps the memory
            hello["pid"] = board.pid
            return sock, hello, board, pools
        except BaseException:
            sock.close()
            raise

    def _closed(self, conn: _Connection) -> None:
        self._lost(conn, "the engine process exited; it is being restarted")

    async def _watch(self) -> None:
        """Fail everything at once if the engine hangs; reconnect once it is gone."""
        while True:
            await asyncio.sleep(_WATCH_S)
            conn = self._conn
            if conn is None:
                continue
            if conn.dead is None:
                board_state = conn.board.state
                age = conn.board.beat_age()
                if age > HUNG_AFTER_S:
                    self._lost(conn, f"the engine process has not answered for {age:.0f} s")
                elif board_state != "ready" and self.state == "ready":
                    self._set_state(
                        "draining" if board_state == "draining" else "loading",
                        f"the engine is {board_state}",
                    )
                elif board_state == "ready" and self.state != "ready":
                    self._set_state("ready", "ok")
                continue
            if not conn.closed and not conn.killed and conn.board.beat_age() > KILL_AFTER_S:
                self._kill(conn)  # hung, not gone: a restart is the only cure
            if self._closing or not conn.closed:
                continue
            with contextlib.suppress(EngineUnavailable):
                await self._connect()

    def _kill(self, conn: _Connection) -> None:
        conn.killed = True
        pid = conn.board.pid
        if pid > 0:
            log.error("the engine process (pid %d) hangs; killing it for a restart", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _lost(self, conn: _Connection, why: str) -> None:
        if conn.dead is None:
            conn.dead = why
            log.error("%s; failing its %d waiting requests", why, len(conn.waiting))
            self._set_state("loading", why)
        self._fail_all(conn, why)

    def _fail_all(self, conn: _Connection, why: str) -> None:
        conn.dead = conn.dead or why
        waiting, conn.waiting = conn.waiting, {}
        for answer, pool, slot in waiting.values():
            if answer.done():  # its caller left earlier; nobody reads the slot any more
                pool.give(slot)
            else:
                answer.set_exception(EngineUnavailable(why))

    def _set_state(self, state: EngineState, reason: str) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        self.state, self.reason = state, reason
        if self._on_state is not None:
            self._on_state(state, reason)


@functools.lru_cache(maxsize=64)
def _ranked(k: int, room: int) -> struct.Struct:
    """Return the layout of a slot's k best indices (int32) and, `room` places on, their
    scores (float32): service.engine.shm.Slots."""
    return struct.Struct(f"<{k}i{4 * (room - k)}x{k}f")


def _image_error(data: np.ndarray) -> image_errors.ImageError:
    """Rebuild the ImageError the engine's decoder raised, so it maps to the same 4xx."""
    name, message = wire.parse_bad_image(data.tobytes())
    kind = getattr(image_errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, image_errors.ImageError)):
        kind = image_errors.ImageError  # an engine newer than this front end: still a 400
    return kind(message)


def _error(status: int) -> Exception:
    if status == wire.DEADLINE:
        return DeadlineExceeded("deadline passed while waiting for the model")
    if status == wire.CLOSED:
        return BatcherClosed("the engine is shutting down")
    if status == wire.FULL:
        return QueueFull("the engine's queue is full; retry shortly")
    if status == wire.CANCELLED:
        return EngineUnavailable("the engine dropped the request")
    if status == wire.INVALID:
        return ValueError("the engine refused the input's shape or kind")
    return InferenceFailed("inference failed in the engine process")
