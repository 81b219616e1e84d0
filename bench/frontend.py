"""`hiera-bench --frontend`: CPU milliseconds per request spent outside the model, by stage.

The server (bench/frontend_server.py) runs the real service with the model replaced by a sleep
of fixed latency. Closed-loop clients post single 500x375 JPEGs to /v1/classify; the server's
own per-thread CPU clocks, read before and after a fixed number of requests, split its CPU time
into stages: decode + preprocess (the decode threads; split by their wall-time ratio from
/metrics), the event loop (HTTP parsing, routing, batching, postprocess, metrics, JSON), the
model threads, and the rest. `http_floor` is the event loop's CPU per request for the same
body posted to a route that only reads it: HTTP, FastAPI and middleware, no service work.
CPU time, unlike wall time, moves little when other jobs share the cores. Several code trees
(`--run`) are measured in alternation, so a before/after pair shares the same minutes of the
same machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SERVER = Path(__file__).with_name("frontend_server.py")
STAGES = ("decode", "preprocess", "event_loop", "model_threads", "other", "total", "http_floor")


@dataclass(frozen=True)
class CodeRun:
    """One measured configuration: a label and the source tree to import `service` from."""

    label: str
    source: Path | None  # None: the installed hiera-serve

    @classmethod
    def parse(cls, spec: str) -> CodeRun:
        """Parse `label:source`, source `.` meaning the installed code."""
        label, sep, source = spec.partition(":")
        if not sep or not label or not source:
            raise ValueError(f"--run takes label:source, got {spec!r}")
        return cls(label, None if source == "." else Path(source).resolve())


def measure(
    runs: list[CodeRun],
    *,
    image: bytes,
    requests: int,
    warmup: int,
    concurrency: int,
    repeats: int,
    latency_ms: float,
    max_batch_size: int,
    max_delay_ms: float,
) -> dict[str, Any]:
    """Measure every run `repeats` times, alternating runs, and summarise each stage."""
    results: dict[str, list[dict[str, Any]]] = {run.label: [] for run in runs}
    for _ in range(repeats):
        for run in runs:
            server = _start(run, latency_ms, max_batch_size, max_delay_ms)
            try:
                results[run.label].append(
                    asyncio.run(_drive(server.url, image, requests, warmup, concurrency))
                )
            finally:
                server.stop()
    summary = {
        label: {
            stage: _spread([r["cpu_ms_per_request"][stage] for r in samples]) for stage in STAGES
        }
        | {"mean_batch_size": statistics.fmean(r["mean_batch_size"] for r in samples)}
        for label, samples in results.items()
    }
    return {
        "requests_per_repeat": requests,
        "concurrency": concurrency,
        "model_latency_ms": latency_ms,
        "max_batch_size": max_batch_size,
        "max_delay_ms": max_delay_ms,
        "image": "500x375 JPEG",
        "runs": [{"label": r.label, "source": str(r.source or "installed")} for r in runs],
        "repeats": results,
        "summary": summary,
    }


@dataclass
class _Server:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _start(run: CodeRun, latency_ms: float, max_batch_size: int, max_delay_ms: float) -> _Server:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if run.source is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(run.source), env.get("PYTHONPATH")]))
    command = [
        sys.executable, str(SERVER), "--port", str(port), "--latency-ms", str(latency_ms),
        "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(max_delay_ms),
    ]  # fmt: skip
    server = _Server(f"http://127.0.0.1:{port}", subprocess.Popen(command, env=env))
    deadline = time.monotonic() + 120
    while True:
        if server.process.poll() is not None:
            status = server.process.returncode
            raise RuntimeError(f"front-end server ({run.label}) exited with {status}")
        try:
            if httpx.get(f"{server.url}/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"front-end server ({run.label}) not ready in 120 s")
        time.sleep(0.1)


async def _drive(
    url: str, image: bytes, requests: int, warmup: int, concurrency: int
) -> dict[str, Any]:
    headers = {"Content-Type": "image/jpeg"}
    limits = httpx.Limits(max_connections=concurrency)
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def post(count: int, path: str = "/v1/classify") -> None:
            remaining = [count]

            async def worker() -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    response = await client.post(path, content=image, headers=headers)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        await post(warmup)  # connections open, caches warm, lazy imports done
        statuses.clear()
        cpu_before, metrics_before = await _snapshot(client)
        started = time.perf_counter()
        await post(requests)
        elapsed = time.perf_counter() - started
        cpu_after, metrics_after = await _snapshot(client)
        measured = dict(statuses)
        # The same body to a route that only reads it: what HTTP, FastAPI and the middleware
        # cost on the event loop with no service work at all.
        floor_before = (await client.get("/bench/cpu")).json()["threads"]["MainThread"]
        await post(requests, "/bench/floor")
        floor_after = (await client.get("/bench/cpu")).json()["threads"]["MainThread"]
    report = _stages(cpu_before, cpu_after, metrics_before, metrics_after, requests)
    report["cpu_ms_per_request"]["http_floor"] = 1e3 * (floor_after - floor_before) / requests
    return report | {"statuses": measured, "wall_s": elapsed}


async def _snapshot(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    # Metrics first: the CPU read then brackets only the measured requests and this scrape.
    text = (await client.get("/metrics")).text
    cpu = (await client.get("/bench/cpu")).json()
    wanted = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "hiera_stage_duration_seconds_sum" and s.labels["endpoint"] == "classify":
                wanted[s.labels["stage"]] = s.value
            elif s.name in ("hiera_batch_size_sum", "hiera_batch_size_count"):
                wanted[s.name] = s.value
    return cpu, wanted


def _stages(
    cpu0: dict[str, Any], cpu1: dict[str, Any], m0: dict[str, float], m1: dict[str, float],
    requests: int,
) -> dict[str, Any]:  # fmt: skip
    def thread_delta(prefix: str) -> float:
        return sum(
            seconds - cpu0["threads"].get(name, 0.0)
            for name, seconds in cpu1["threads"].items()
            if name.startswith(prefix)
        )

    decoding = thread_delta("hiera-decode")
    event_loop = thread_delta("MainThread")
    model = thread_delta("hiera-infer")
    total = cpu1["process"] - cpu0["process"]
    wall = {s: m1.get(s, 0.0) - m0.get(s, 0.0) for s in ("decode", "preprocess")}
    decode_share = wall["decode"] / (wall["decode"] + wall["preprocess"] or 1.0)
    per_request = {
        "decode": decoding * decode_share,
        "preprocess": decoding * (1 - decode_share),
        "event_loop": event_loop,
        "model_threads": model,
        "other": total - decoding - event_loop - model,
        "total": total,
    }
    batches = m1.get("hiera_batch_size_count", 0.0) - m0.get("hiera_batch_size_count", 0.0)
    images = m1.get("hiera_batch_size_sum", 0.0) - m0.get("hiera_batch_size_sum", 0.0)
    return {
        "cpu_ms_per_request": {k: 1e3 * v / requests for k, v in per_request.items()},
        "mean_batch_size": images / batches if batches else 0.0,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def print_table(report: dict[str, Any]) -> None:
    """Print CPU ms per request by stage: median [min-max] over the repeats, per run."""
    print(
        f"\nfront-end CPU ms per request ({report['image']}, {report['requests_per_repeat']} "
        f"requests x {len(next(iter(report['repeats'].values())))} repeats, concurrency "
        f"{report['concurrency']}, model = sleep {report['model_latency_ms']} ms)"
    )
    print(f"  {'run':<8}" + "".join(f"{stage:>22}" for stage in STAGES) + "   mean batch")
    for label, stages in report["summary"].items():
        cells = "".join(
            f"{s['median']:>9.3f} [{s['min']:.3f}-{s['max']:.3f}]".rjust(22)
            for s in (stages[stage] for stage in STAGES)
        )
        print(f"  {label:<8}{cells}   {stages['mean_batch_size']:.2f}")
