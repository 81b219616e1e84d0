"""Drive an HTTP server closed-loop (N clients) or open-loop (Poisson arrivals at a fixed rate).

Open-loop latency counts from each request's *scheduled* arrival, not from when the client got
round to sending it, so a server that falls behind cannot hide its queue (coordinated
omission). Both modes scrape hiera-serve's own stage histograms before and after, so a report
says where the time went; a server without `/metrics` (the baseline) just gets none.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

STAGES = ("decode", "preprocess", "queue", "inference", "postprocess")
_HEADERS = {"Content-Type": "image/jpeg"}


async def closed_loop(
    url: str, image: bytes, *, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Run `concurrency` clients that each send the next request when the last one returns."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = await scrape(client)
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                response = await client.post("/v1/classify", content=image, headers=_HEADERS)
                latencies.append(time.perf_counter() - t0)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = await scrape(client)
    return _closed(concurrency, elapsed, latencies, statuses, [], before, after)


def _closed(
    concurrency: int,
    elapsed: float,
    latencies: list[float],
    statuses: dict[int, int],
    reference_s: list[float],
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    return {
        "mode": "closed",
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": len(latencies),
        "statuses": statuses,
        "images_per_s": statuses.get(200, 0) / elapsed,
        "latency_ms": percentiles(latencies),
        "reference_ms": percentiles(reference_s),
    } | stage_delta(before, after)


def one_client(
    url: str,
    image: bytes,
    *,
    seconds: float,
    reference: Callable[[], object] | None = None,
    slices: int = 8,
) -> dict[str, Any]:
    """One client, one keep-alive connection, each request sent when the last one returned.

    This is the light-load latency, so the client is as lean as a load generator's (a raw
    socket, one prebuilt request): httpx spends about 0.4-0.6 ms more per request on its own
    work (measured against a trivial route: 0.58-0.73 against 0.14-0.19 ms p50), and here
    that would count against the server. With `reference` (the raw runtime's call, in this
    process), the run is cut in `slices`, each followed by `reference` timed in a loop for as
    long: the host's speed flips within seconds, and only figures taken in the same seconds
    compare. The result's `slices` pairs each slice's p50 with the raw p50 timed right after.
    """
    host, _, port = url.removeprefix("http://").partition(":")
    request = request_bytes(host, int(port), image, close=False)
    latencies: list[float] = []
    reference_s: list[float] = []
    paired: list[dict[str, float]] = []  # each slice's p50 and the raw p50 right after it
    statuses: dict[int, int] = {}
    parts = slices if reference is not None else 1
    elapsed = 0.0
    with httpx.Client(base_url=url, timeout=30) as scraper:
        before = scrape_sync(scraper)
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(parts):
                started = time.perf_counter()
                stop = started + seconds / parts
                first, first_reference = len(latencies), len(reference_s)
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    sock.sendall(request)
                    status = _read_response(sock)
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                elapsed += time.perf_counter() - started
                if reference is not None:
                    # The server idles while the raw runtime is timed for as long.
                    stop = time.perf_counter() + seconds / parts
                    while time.perf_counter() < stop:
                        t0 = time.perf_counter()
                        reference()
                        reference_s.append(time.perf_counter() - t0)
                    paired.append({
                        "p50_ms": 1e3 * statistics.median(latencies[first:]),
                        "reference_p50_ms": 1e3 * statistics.median(reference_s[first_reference:]),
                    })  # fmt: skip
        after = scrape_sync(scraper)
    result = _closed(1, elapsed, latencies, statuses, reference_s, before, after)
    return result | {"client": "raw socket, keep-alive", "slices": paired}


def request_bytes(host: str, port: int, image: bytes, *, close: bool = True) -> bytes:
    """Return one complete `POST /v1/classify` request for `image` (a JPEG), asking the server
    to close the connection after answering unless `close` is False (keep-alive)."""
    lines = [
        "POST /v1/classify HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: image/jpeg",
        f"Content-Length: {len(image)}",
        *(["Connection: close"] if close else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + image


def _read_response(sock: socket.socket) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; return its status."""
    received = b""
    while not complete(received):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection mid-response: {received!r}")
        received += chunk
    return int(received.split(b" ", 2)[1])


def complete(received: bytes | bytearray) -> bool:
    """True once `received` holds a response head and the whole body its Content-Length names."""
    head, sep, body = bytes(received).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


async def open_loop(
    url: str, image: bytes, *, rate: float, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Send requests at Poisson arrivals of `rate` per second for `seconds`, never waiting."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * seconds * 2) + 10))
    arrivals = arrivals[arrivals < seconds]
    ok: list[float] = []
    rejected: list[float] = []
    statuses: dict[int, int] = {}
    # Enough connections that the client never queues: a request waits only inside the server.
    limits = httpx.Limits(max_connections=max(64, int(rate * 10)))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        before = await scrape(client)
        start = time.perf_counter()

        async def one(at: float) -> None:
            try:
                response = await client.post("/v1/classify", content=image, headers=_HEADERS)
                code = response.status_code
            except httpx.HTTPError:
                code = 0  # connection refused or reset: counted, never hidden
            latency = time.perf_counter() - (start + at)
            statuses[code] = statuses.get(code, 0) + 1
            (ok if code == 200 else rejected).append(latency)

        tasks = []
        for at in arrivals:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(float(at))))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        after = await scrape(client)
    return {
        "mode": "open",
        "offered_per_s": rate,
        "sent": len(arrivals),
        "seconds": elapsed,
        "statuses": statuses,
        "images_per_s": statuses.get(200, 0) / elapsed,
        "accepted_fraction": statuses.get(200, 0) / max(1, len(arrivals)),
        "latency_ms": percentiles(ok),
        "rejected_latency_ms": percentiles(rejected),
    } | stage_delta(before, after)


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Read stage and batch-size histogram sums and counts from `/metrics` (empty if none)."""
    return _stage_sums(await client.get("/metrics"))


def scrape_sync(client: httpx.Client) -> dict[str, float]:
    """`scrape`, for a synchronous client."""
    return _stage_sums(client.get("/metrics"))


def _stage_sums(response: httpx.Response) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    if response.status_code != 200:
        return {}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if s.name in ("hiera_batch_size_sum", "hiera_batch_size_count"):
                found[s.name] = s.value
            elif s.name.startswith("hiera_stage_duration_seconds") and s.name.endswith(
                ("_sum", "_count")
            ):
                key = f"{s.labels['stage']}{s.name[len('hiera_stage_duration_seconds') :]}"
                found[key] = found.get(key, 0.0) + s.value  # summed over endpoints
    return found


def stage_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    if not after:
        return {"stages_ms": None, "mean_batch_size": None}
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    stages = {
        stage: 1e3 * diff[f"{stage}_sum"] / diff[f"{stage}_count"]
        for stage in STAGES
        if diff.get(f"{stage}_count")
    }
    batches = diff.get("hiera_batch_size_count", 0.0)
    mean_batch = diff.get("hiera_batch_size_sum", 0.0) / batches if batches else 0.0
    return {"stages_ms": stages, "mean_batch_size": mean_batch}


def percentiles(seconds: list[float]) -> dict[str, float] | None:
    """Return p50/p95/p99/mean in milliseconds, or None for no samples."""
    if not seconds:
        return None
    ms = sorted(1e3 * s for s in seconds)
    # Inclusive: percentiles stay within the samples (exclusive extrapolates past the max).
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"p50": q[49], "p95": q[94], "p99": q[98], "mean": statistics.fmean(ms)}
