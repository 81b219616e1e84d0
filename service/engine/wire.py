"""The corridor's control messages: fixed 32-byte frames on a Unix stream socket.

A front end sends SUBMIT (an input is in slot `slot` of pool `pool`: run it) and CANCEL (its
caller left); the engine answers every SUBMIT with exactly one RESULT, whose outputs it wrote
into the same slot. Only after the RESULT may the front end reuse the slot. Deadlines are
CLOCK_MONOTONIC instants, one clock for every process on the host. The handshake before the
frames is JSON with file descriptors attached (service.engine.client and .process).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

FRAME = 32
SUBMIT, CANCEL, RESULT = 1, 2, 3
# Pools of slots: uint8 crops, float32 tensors.
CROPS, TENSORS = 0, 1
# What a SUBMIT wants back, as bits.
WANT_EMBEDDING, WANT_LOGITS = 1, 2
# How a RESULT ended (the front end raises the matching error).
OK, DEADLINE, CLOSED, FAILED, CANCELLED, FULL, INVALID = range(7)

# type, request id, pool, slot, top_k, want bits, deadline (0 = none)
_SUBMIT = struct.Struct("<BIBIHBd")
# type, request id
_CANCEL = struct.Struct("<BI")
# type, request id, status, batch size, k, queue seconds, inference seconds
_RESULT = struct.Struct("<BIBHHdd")
_PAD = bytes(FRAME)


def _frame(packed: bytes) -> bytes:
    return packed + _PAD[len(packed) :]


def submit(request: int, pool: int, slot: int, top_k: int, want: int, deadline: float) -> bytes:
    return _frame(_SUBMIT.pack(SUBMIT, request, pool, slot, top_k, want, deadline))


def cancel(request: int) -> bytes:
    return _frame(_CANCEL.pack(CANCEL, request))


def result(
    request: int, status: int, batch_size: int, k: int, queue_s: float, infer_s: float
) -> bytes:
    return _frame(_RESULT.pack(RESULT, request, status, batch_size, k, queue_s, infer_s))


def parse_submit(frame: bytes | memoryview) -> tuple[int, int, int, int, int, float]:
    _, request, pool, slot, top_k, want, deadline = _SUBMIT.unpack_from(frame)
    return request, pool, slot, top_k, want, deadline


def parse_cancel(frame: bytes | memoryview) -> int:
    return int(_CANCEL.unpack_from(frame)[1])


def parse_result(frame: bytes | memoryview) -> tuple[int, int, int, int, float, float]:
    _, request, status, batch_size, k, queue_s, infer_s = _RESULT.unpack_from(frame)
    return request, status, batch_size, k, queue_s, infer_s


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
