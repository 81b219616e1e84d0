"""`hiera-bench`: raw runtime throughput vs the full HTTP service, measured in one run.

Both numbers come from the same machine in the same minute, so their ratio (how much the
service keeps of what the runtime can do) is meaningful even on noisy shared hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.runtime.loader import plan
from service.settings import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hiera-bench", description=__doc__)
    p.add_argument("--model-repository", type=Path, help="hiera-export output")
    p.add_argument("--backend", default="onnx", choices=["onnx", "torchscript", "eager"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-sizes", default="1,8", help="raw runtime batch sizes")
    p.add_argument("--max-batch-size", type=int, default=8, help="service batching limit")
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    p.add_argument("--image", type=Path, default=Path("examples/grace_hopper.jpg"))
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="JSON output folder")
    front = p.add_argument_group(
        "front-end mode", "--frontend: the model is a sleep; CPU ms per request by stage"
    )
    front.add_argument("--frontend", action="store_true", help="measure front-end CPU cost")
    front.add_argument("--requests", type=int, default=2000, help="measured requests per repeat")
    front.add_argument("--warmup", type=int, default=200, help="unmeasured requests first")
    front.add_argument("--repeats", type=int, default=3, help="repeats of every --run")
    front.add_argument("--latency-ms", type=float, default=5.0, help="the sleeping model's latency")
    front.add_argument(
        "--run",
        action="append",
        metavar="LABEL:SOURCE",
        help="code to measure: SOURCE is a source tree holding service/ (`.` = the installed "
        "code); repeatable, measured in alternation (default: current:.)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.frontend:
        return _frontend(args)
    if args.model_repository is None:
        parser.error("--model-repository is required (except with --frontend)")
    settings = Settings(
        model_repository=args.model_repository,
        backend=args.backend,
        precision=args.precision,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
    )
    load_plan = plan(settings)
    device, factory = load_plan.instances[0]
    height, width = load_plan.card.preprocessing.input_size
    raw = [
        _raw(factory, int(b), (3, height, width), args.seconds) for b in args.batch_sizes.split(",")
    ]
    best_raw = max(r["images_per_s"] for r in raw)
    service = _service(args, args.image.read_bytes())
    report = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "model": load_plan.card.name,
        "backend": args.backend,
        "precision": args.precision,
        "raw": raw,
        "service": service,
        "service_vs_best_raw": service["images_per_s"] / best_raw,
    }
    _print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"bench-{load_plan.card.name}-{args.backend}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


def _frontend(args: argparse.Namespace) -> int:
    from bench import frontend

    runs = [frontend.CodeRun.parse(spec) for spec in args.run or ["current:."]]
    report = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine("cpu"),
    } | frontend.measure(
        runs,
        image=frontend.jpeg_500x375(args.image),
        requests=args.requests,
        warmup=args.warmup,
        concurrency=args.concurrency,
        repeats=args.repeats,
        latency_ms=args.latency_ms,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
    )
    frontend.print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"frontend-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


def _raw(factory: Any, batch_size: int, shape: tuple[int, ...], seconds: float) -> dict[str, Any]:
    """Time backend.infer alone, the ceiling the service is measured against."""
    backend = factory()
    batch = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
    for _ in range(2):
        backend.infer(batch)
    latencies: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 3:
        t0 = time.perf_counter()
        backend.infer(batch)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    backend.close()
    return {
        "batch_size": batch_size,
        "images_per_s": batch_size * len(latencies) / elapsed,
        "batch_latency_ms": _percentiles(latencies),
    }


def _service(args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    """Run the real server and drive it with closed-loop concurrent clients."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "service.cli", "--model-repository", str(args.model_repository),
        "--backend", args.backend, "--precision", args.precision, "--device", args.device,
        "--max-batch-size", str(args.max_batch_size), "--max-delay-ms", str(args.max_delay_ms),
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        return asyncio.run(_load(url, image, args.concurrency, args.seconds))
    finally:
        process.terminate()
        process.wait(60)


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"hiera-serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError("hiera-serve did not become ready in 600 s")


async def _load(url: str, image: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    headers = {"Content-Type": "image/jpeg"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        before = await _batch_stats(client)
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                response = await client.post("/v1/classify", content=image, headers=headers)
                latencies.append(time.perf_counter() - t0)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        after = await _batch_stats(client)
    batches = after[0] - before[0]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "statuses": statuses,
        "images_per_s": statuses.get(200, 0) / elapsed,
        "latency_ms": _percentiles(latencies),
        "mean_batch_size": (after[1] - before[1]) / batches if batches else 0.0,
    }


async def _batch_stats(client: httpx.AsyncClient) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for s in family.samples:
            if s.name == "hiera_batch_size_count":
                count = s.value
            elif s.name == "hiera_batch_size_sum":
                total = s.value
    return count, total


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1e3 * s for s in seconds)
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    return {"p50": q[49], "p95": q[94], "p99": q[98], "mean": statistics.fmean(ms)}


def _machine(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(int(device.split(":")[1]))
    return info


def _print(report: dict[str, Any]) -> None:
    print(
        f"\n{report['model']} on {report['backend']} ({report['precision']}), {report['machine']}"
    )
    for r in report["raw"]:
        lat = r["batch_latency_ms"]
        print(f"  raw batch {r['batch_size']:>3}: {r['images_per_s']:8.1f} img/s   "
              f"batch p50 {lat['p50']:.1f} ms  p95 {lat['p95']:.1f} ms")  # fmt: skip
    s = report["service"]
    lat = s["latency_ms"]
    print(f"  service x{s['concurrency']:>3}: {s['images_per_s']:8.1f} img/s   "
          f"request p50 {lat['p50']:.1f} ms  p95 {lat['p95']:.1f} ms  p99 {lat['p99']:.1f} ms  "
          f"mean batch {s['mean_batch_size']:.2f}  statuses {s['statuses']}")  # fmt: skip
    print(f"  service / best raw: {report['service_vs_best_raw']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
