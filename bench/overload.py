"""Overload: how fast hiera-serve says no, at 3x its capacity and to a burst of 200 at once.

The client writes prebuilt HTTP/1.1 requests on raw sockets (one connection per request, as
independent callers would) and times each answer from the moment its request was written, or,
open loop, from its scheduled Poisson arrival. A Python HTTP client would spend more CPU per
request than the server does to reject it, and on a small machine that CPU is the server's.
For the burst, all connections are opened first and then every request is written at once.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from typing import Any

import numpy as np

from bench.load import complete, percentiles, request_bytes


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read a response to the end; return its status and whether it has Retry-After."""
    status_line = await reader.readline()
    status = int(status_line.split()[1]) if status_line else 0
    headers = (await reader.readuntil(b"\r\n\r\n")).lower() if status else b""
    await reader.read()  # Connection: close: the body ends with the connection
    return status, b"\nretry-after:" in b"\n" + headers


class Tally:
    """Answers by status, with their latencies; rejections that lacked Retry-After."""

    def __init__(self) -> None:
        self.by_status: dict[int, list[float]] = {}
        self.rejections_without_retry_after = 0

    def add(self, status: int, seconds: float, retry_after: bool) -> None:
        self.by_status.setdefault(status, []).append(seconds)
        if status in (429, 503) and not retry_after:
            self.rejections_without_retry_after += 1

    def report(self) -> dict[str, Any]:
        rejected = self.by_status.get(429, []) + self.by_status.get(503, [])
        rejected_ms = percentiles(rejected)
        if rejected_ms is not None:
            rejected_ms["max"] = 1e3 * max(rejected)
        return {
            "statuses": {s: len(v) for s, v in sorted(self.by_status.items())},
            "rejected_ms": rejected_ms,
            "accepted_ms": percentiles(self.by_status.get(200, [])),
            "rejections_without_retry_after": self.rejections_without_retry_after,
        }


async def _one(host: str, port: int, payload: bytes, since: float, tally: Tally) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        await writer.drain()
        status, retry_after = await _answer(reader)
        writer.close()
    except (OSError, asyncio.IncompleteReadError):
        status, retry_after = 0, False  # no answer at all: counted under status 0
    tally.add(status, time.perf_counter() - since, retry_after)


async def open_loop(
    host: str, port: int, image: bytes, *, rate: float, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Poisson arrivals at `rate`/s for `seconds`; latency from each scheduled arrival."""
    payload = request_bytes(host, port, image)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 1.2) + 1))
    arrivals = arrivals[arrivals < seconds]
    tally = Tally()
    started = time.perf_counter()
    tasks = []
    for at in arrivals:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        tasks.append(asyncio.create_task(_one(host, port, payload, started + at, tally)))
    await asyncio.gather(*tasks)
    return {"mode": "open", "rate": rate, "seconds": seconds, "requests": len(arrivals)} | (
        tally.report()
    )


def burst(
    host: str, port: int, image: bytes, *, count: int, pooled: Tally | None = None
) -> dict[str, Any]:
    """Open `count` connections, then write every request at once; time each from its write.

    One thread with non-blocking sockets and a selector, not asyncio: an asyncio client spends
    about 0.15 ms per connection on its own bookkeeping, and since it reads no answer until it
    has written every request, a burst of 200 measured 25-35 ms of client time even against a
    server that answers 429 without doing anything. Here an answer is timed when it has
    arrived whole (head and Content-Length body), as an HTTP client would hand it over: the
    server's close comes 5-10 ms later in a burst, its connection teardown batched. Every
    answer is also added to `pooled`, for figures over several bursts.
    """
    payload = request_bytes(host, port, image)
    sockets = [socket.create_connection((host, port)) for _ in range(count)]
    time.sleep(0.2)  # every handshake done and accepted: the burst times requests only
    selector = selectors.DefaultSelector()
    conns = [_Conn(s, payload) for s in sockets]
    for conn in conns:  # write all first, as fast as the kernel takes them
        conn.sock.setblocking(False)
        conn.since = time.perf_counter()
        conn.write()
        selector.register(conn.sock, conn.events(), conn)
    tally = Tally()
    tallies = [tally] if pooled is None else [tally, pooled]
    open_count = count
    while open_count:
        ready = selector.select(timeout=30)
        if not ready:
            raise TimeoutError(f"{open_count} of {count} burst requests got no answer in 30 s")
        for key, mask in ready:
            conn = key.data
            if mask & selectors.EVENT_WRITE:
                conn.write()
            if mask & selectors.EVENT_READ and conn.read():
                status, retry_after = conn.answer()
                seconds = (conn.answered or time.perf_counter()) - conn.since
                for into in tallies:
                    into.add(status, seconds, retry_after)
                selector.unregister(conn.sock)
                conn.sock.close()
                open_count -= 1
                continue
            selector.modify(conn.sock, conn.events(), conn)
    selector.close()
    return {"mode": "burst", "requests": count} | tally.report()


class _Conn:
    """One burst connection: what is left to send, and what came back."""

    def __init__(self, sock: socket.socket, payload: bytes) -> None:
        self.sock = sock
        self.unsent = memoryview(payload)
        self.received = bytearray()
        self.since = 0.0
        self.answered: float | None = None  # when the whole answer had arrived

    def events(self) -> int:
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if self.unsent else 0)

    def write(self) -> None:
        try:
            self.unsent = self.unsent[self.sock.send(self.unsent) :]
        except BlockingIOError:
            pass
        except OSError:  # answered and closed before the whole body went: stop sending
            self.unsent = memoryview(b"")

    def read(self) -> bool:
        """Take what arrived; True once the server has closed (Connection: close)."""
        try:
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            return True
        self.received += chunk
        if self.answered is None and complete(self.received):
            self.answered = time.perf_counter()
        return not chunk

    def answer(self) -> tuple[int, bool]:
        head = bytes(self.received).split(b"\r\n\r\n", 1)[0].lower()
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return status, b"\nretry-after:" in head
