"""Overload: how fast hiera-serve says no, at 3x its capacity and to a burst of 200 at once.

The client writes prebuilt HTTP/1.1 requests on raw sockets (one connection per request, as
independent callers would) and times each answer from the moment its request was written, or,
open loop, from its scheduled Poisson arrival. A Python HTTP client would spend more CPU per
request than the server does to reject it, and on a small machine that CPU is the server's.
For the burst, all connections are opened first and then every request is written at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from bench.load import percentiles


def request_bytes(host: str, port: int, image: bytes) -> bytes:
    """Return one complete `POST /v1/classify` request for `image` (a JPEG)."""
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(image)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + image


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read a response to the end; return its status and whether it has Retry-After."""
    status_line = await reader.readline()
    status = int(status_line.split()[1]) if status_line else 0
    headers = (await reader.readuntil(b"\r\n\r\n")).lower() if status else b""
    await reader.read()  # Connection: close: the body ends with the connection
    return status, b"\nretry-after:" in b"\n" + headers


class _Tally:
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


async def _one(host: str, port: int, payload: bytes, since: float, tally: _Tally) -> None:
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
    tally = _Tally()
    started = time.perf_counter()
    tasks = []
    for at in arrivals:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        tasks.append(asyncio.create_task(_one(host, port, payload, started + at, tally)))
    await asyncio.gather(*tasks)
    return {"mode": "open", "rate": rate, "seconds": seconds, "requests": len(arrivals)} | (
        tally.report()
    )


async def burst(host: str, port: int, image: bytes, *, count: int) -> dict[str, Any]:
    """Open `count` connections, then write every request at once; time each from its write."""
    payload = request_bytes(host, port, image)
    connections = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(count)))
    tally = _Tally()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        since = time.perf_counter()
        writer.write(payload)
        try:
            await writer.drain()
            status, retry_after = await _answer(reader)
        except (OSError, asyncio.IncompleteReadError):
            status, retry_after = 0, False
        tally.add(status, time.perf_counter() - since, retry_after)
        writer.close()

    await asyncio.gather(*(one(r, w) for r, w in connections))
    return {"mode": "burst", "requests": count} | tally.report()
