"""The corridor's control messages: fixed 32-byte frames on a Unix stream socket.

A front end sends SUBMIT (an input is in slot `slot` of pool `pool`: run it) and CANCEL (its
caller left); the engine answers every SUBMIT with exactly one RESULT, whose outputs it wrote
into the same slot. Only after the RESULT may the front end reuse the slot. In the JPEGS pool
the input is an encoded image of `length` bytes, which an engine that decodes on its device
decodes and crops first; if it refuses the image (BAD_IMAGE), the slot's input area holds the
error instead, `k` bytes of JSON (`bad_image`). Deadlines are CLOCK_MONOTONIC instants, one
clock for every process on the host. The handshake before the frames is JSON with file
descriptors attached (service.engine.client and .process).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any, cast

FRAME = 32
SUBMIT, CANCEL, RESULT = 1, 2, 3
# Pools of slots: uint8 crops, float32 tensors, encoded JPEGs (bytes) for the engine to decode.
CROPS, TENSORS, JPEGS = 0, 1, 2
# What a SUBMIT wants back, as bits.
WANT_EMBEDDING, WANT_LOGITS = 1, 2
# How a RESULT ended (the front end raises the matching error).
OK, DEADLINE, CLOSED, FAILED, CANCELLED, FULL, INVALID, BAD_IMAGE = range(8)

# Each frame is packed and unpacked whole, its padding included (one call, no concatenation).
# type, request id, pool, slot, top_k, want bits, deadline (0 = none), input bytes (JPEGS;
# 0 otherwise): 25 bytes
SUBMIT_FRAME = struct.Struct("<BIBIHBdI7x")
# type, request id
_CANCEL = struct.Struct("<BI27x")
# type, request id, status, batch size, k, then seconds spent queued, in the model, decoding and
# preprocessing (the last two by an engine that decoded a JPEG; else 0): 26 bytes. Float32
# seconds are exact to a microsecond under 8 s, which is all the stage metrics resolve.
RESULT_FRAME = struct.Struct("<BIBHHffff6x")
assert SUBMIT_FRAME.size == _CANCEL.size == RESULT_FRAME.size == FRAME


def submit(
    request: int, pool: int, slot: int, top_k: int, want: int, deadline: float, length: int = 0
) -> bytes:
    return SUBMIT_FRAME.pack(SUBMIT, request, pool, slot, top_k, want, deadline, length)


def cancel(request: int) -> bytes:
    return _CANCEL.pack(CANCEL, request)


def result(
    request: int,
    status: int,
    batch_size: int,
    k: int,
    queue_s: float,
    infer_s: float,
    decode_s: float = 0.0,
    preprocess_s: float = 0.0,
) -> bytes:
    return RESULT_FRAME.pack(
        RESULT, request, status, batch_size, k, queue_s, infer_s, decode_s, preprocess_s
    )


def parse_cancel(frame: bytes | memoryview, offset: int = 0) -> int:
    return int(_CANCEL.unpack_from(frame, offset)[1])


def bad_image(name: str, message: str, room: int) -> bytes:
    """Encode a refused image's error (its ImageError class and message) in at most `room` bytes."""
    for cut in (len(message), 1024, 0):  # a message too long for the room is shortened
        data = json.dumps({"error": name, "message": message[:cut]}).encode()
        if len(data) <= room:
            return data
    raise ValueError(f"{room} bytes cannot hold the error {name}")


def parse_bad_image(data: bytes | memoryview) -> tuple[str, str]:
    """Return the class name and message a BAD_IMAGE result carries."""
    error = json.loads(bytes(data))
    return str(error["error"]), str(error["message"])


class Outbox:
    """Send the frames put in one loop turn together: one write (one syscall) per turn.

    A batch's results, or a burst's submits, resolve in the same turn; written one by one each
    would cost a send() of its own.
    """

    def __init__(
        self, writer: asyncio.WriteTransport | asyncio.StreamWriter, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._writer = writer
        # Held, not looked up per frame: asyncio.get_running_loop() costs a getpid() syscall
        # on Python 3.11.
        self._loop = loop
        self._frames: list[bytes] = []

    def put(self, frame: bytes) -> None:
        if not self._frames:
            self._loop.call_soon(self._flush)
        self._frames.append(frame)

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        if not self._writer.is_closing():
            self._writer.write(frames[0] if len(frames) == 1 else b"".join(frames))


class FrameProtocol(asyncio.Protocol):
    """One end of the corridor: splits what arrives into frames for `frame()`, and sends
    through an Outbox."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.outbox: Outbox | None = None
        self.loop = asyncio.get_running_loop()
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.outbox = Outbox(self.transport, self.loop)

    def data_received(self, data: bytes) -> None:
        if not self._pending and len(data) == FRAME:  # at low rates, every frame comes alone
            self.frame(data, 0)
            return
        pending = self._pending + data if self._pending else data
        whole = len(pending) - len(pending) % FRAME
        for start in range(0, whole, FRAME):
            self.frame(pending, start)
        self._pending = pending[whole:]

    def frame(self, frames: bytes, offset: int) -> None:
        """Handle the frame at `offset` of `frames`."""
        raise NotImplementedError


# The handshake: one JSON message, length-prefixed, with file descriptors alongside.
_LENGTH = struct.Struct("<I")
_MAX_HELLO = 16 * 2**20  # the card's labels make it some tens of kilobytes


def send_hello(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    data = json.dumps(message).encode()
    payload = _LENGTH.pack(len(data)) + data
    socket.send_fds(sock, [payload[:4096]], fds)
    if len(payload) > 4096:
        sock.sendall(payload[4096:])


def recv_hello(sock: socket.socket, max_fds: int = 4) -> tuple[dict[str, Any], list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, 4096, max_fds)
    if len(head) < _LENGTH.size:
        for fd in fds:
            _close(fd)
        raise ConnectionError("the corridor closed during the handshake")
    (length,) = _LENGTH.unpack_from(head)
    if length > _MAX_HELLO:
        raise ConnectionError(f"handshake of {length} bytes is too large")
    data = bytearray(head[_LENGTH.size :])
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise ConnectionError("the corridor closed during the handshake")
        data += chunk
    return json.loads(bytes(data[:length])), fds


def _close(fd: int) -> None:
    import os

    os.close(fd)
