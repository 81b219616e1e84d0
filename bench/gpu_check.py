"""`make gpu-check`: every GPU path end to end against CPU fp32, then Hiera-B fp16 throughput.

1. Agreement: ONNX Runtime CUDA and TensorRT in fp32/fp16, TorchScript and eager in fp16/bf16,
   and the device JPEG decoder, each run on real photos and compared with ONNX Runtime fp32 on
   the CPU (embedding cosine, top-1/top-5 agreement); then each device JPEG decoder against the
   exact CPU decode (bench/gpu_decode.py).
2. SDPA probe: whether Hiera's 5-D mask-unit attention can use the fused kernels, and what a
   4-D layout would gain.
3. Throughput: Hiera-B fp16 model-only at batch 64 and 128, and end to end (a real
   `hiera-serve` on the GPU, single-image 500x375 JPEG requests from several client processes):
   the front ends / engines layout with 1, 4, 8 and 12 front ends (CPU decode) and with 12
   front ends passing JPEGs to the engine's device decoder, then the inline layout with device
   decode; img/s, p50/p99, the cores each role kept busy, the engine's mean
   batch, the ratio to model-only; checking that one scrape of /metrics counts every answer.

Writes JSON and prints a table. Without a CUDA device it says so and exits 77 (the code
automake and ctest use for "skipped"), never 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import percentiles, scrape, stage_delta
from bench.photos import jpeg_set, resized_jpeg
from bench.run import _wait_ready
from bench.split import cpu_seconds, process_roles
from service.imaging import Preprocessing, cpu
from service.runtime.feed import Feeder
from service.runtime.loader import plan
from service.runtime.pool import InputSpec, feeder_for
from service.runtime.providers import CUDA, TENSORRT
from service.settings import BackendName, Precision, Settings

SKIPPED = 77
# Reduced precision moves embeddings a little; fp32 on a GPU (TF32 off) must match closely.
MIN_COSINE: dict[str, float] = {"fp32": 0.999, "fp16": 0.995, "bf16": 0.99}


@dataclass(frozen=True)
class GpuPath:
    """One way of serving the model: runtime, precision, providers, where JPEGs decode."""

    name: str
    backend: BackendName
    precision: Precision
    providers: tuple[str, ...] | None = None
    device_decode: bool = False


GPU_PATHS = (
    GpuPath("onnx-cuda-fp32", "onnx", "fp32", (CUDA,)),
    GpuPath("onnx-cuda-fp16", "onnx", "fp16", (CUDA,)),
    GpuPath("onnx-tensorrt-fp32", "onnx", "fp32", (TENSORRT, CUDA)),
    GpuPath("onnx-tensorrt-fp16", "onnx", "fp16", (TENSORRT, CUDA)),
    GpuPath("torchscript-fp16", "torchscript", "fp16"),
    GpuPath("eager-fp16", "eager", "fp16"),
    GpuPath("eager-bf16", "eager", "bf16"),
    GpuPath("device-decode+onnx-cuda-fp32", "onnx", "fp32", (CUDA,), device_decode=True),
    GpuPath("device-decode+torchscript-fp16", "torchscript", "fp16", device_decode=True),
)
REFERENCE = GpuPath("onnx-cpu-fp32", "onnx", "fp32")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__)
    p.add_argument("--model-repository", type=Path, help="hiera-export output (default: export)")
    p.add_argument("--variant", default="hiera_base_224", help="exported when no repository")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/gpu-check"),
        help="scratch folder: the export and the TensorRT caches",
    )
    p.add_argument(
        "--json-dir",
        type=Path,
        default=Path("docs/bench"),
        help="where the run's JSON goes (the documentation's Benchmarks page reads it)",
    )
    p.add_argument("--batch-sizes", default="64,128", help="model-only batch sizes")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    p.add_argument("--concurrency", type=int, default=256, help="end-to-end HTTP clients")
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="workers of the inline layout's runs")
    p.add_argument(
        "--e2e-front-ends",
        default="1,4,8,12",
        help="--engine process runs (one engine, CPU decode): front ends of each, comma-separated",
    )
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--skip-model-only", action="store_true", help="and the attention A/B")
    p.add_argument(
        "--e2e-decode-devices", default="cuda", help="where JPEGs decode: cuda, cpu or cuda,cpu"
    )
    p.add_argument(
        "--e2e-backends",
        default="onnx",
        help="runtimes of the end-to-end servers, comma-separated (onnx, torchscript, eager; "
        "fp16 on the GPU), one run each",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("gpu-check: no CUDA device visible to torch; nothing to check (exit 77, skipped)")
        return SKIPPED
    args.out.mkdir(parents=True, exist_ok=True)
    repo = args.model_repository or _export(args.variant, args.out / "repository")
    trt_cache = args.out / "trt_cache"
    report: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model_repository": str(repo),
    }
    report["agreement"] = []
    if not args.skip_agreement:
        report["agreement"] = check_paths(repo, "cuda:0", GPU_PATHS, jpeg_set(), trt_cache)
        _print_agreement(report["agreement"])
        from bench.gpu_decode import check_device_decoders, print_rows

        report["device_decoders"] = check_device_decoders(repo, trt_cache)
        print_rows(report["device_decoders"])
    if not args.skip_model_only:
        model_figures(report, repo, args, trt_cache)
        from bench import gpu_model  # CUDA graphs, TensorRT, torch.compile; bit-identity

        report["gpu_model"] = gpu_model.figures(
            repo, args.batch_sizes, args.seconds, trt_cache, jpeg_set()
        )
    if not args.skip_e2e:
        report["end_to_end"] = []
        fronts = [int(n) for n in args.e2e_front_ends.split(",") if n]
        layouts = [("process", "cpu", n) for n in fronts]
        # JPEGs through the corridor, decoded by the engine on the GPU.
        layouts += [("process", "cuda", max(fronts))] if fronts else []
        layouts += [("inline", d, args.workers) for d in args.e2e_decode_devices.split(",") if d]
        best = max(
            (v for r in report.get("model_only", []) for k, v in r.items()
             if k.endswith("_img_per_s") and isinstance(v, int | float)),
            default=None,
        )  # fmt: skip
        for backend in args.e2e_backends.split(","):
            for engine, decode, workers in layouts:
                try:
                    run = end_to_end(
                        repo, args, trt_cache, backend, decode, engine=engine, workers=workers
                    )
                    if best:
                        run["over_model_only"] = round(run["images_per_s"] / best, 3)
                except Exception as exc:  # report it: the other runs may still work
                    run = {"backend": f"{backend} fp16", "decode": decode, "engine": engine,
                           "workers": workers, "error": _error(exc)}  # fmt: skip
                    run["metrics_count_ok"] = False
                report["end_to_end"].append(run)
                print(f"\nend to end: {json.dumps(run)}")
    args.json_dir.mkdir(parents=True, exist_ok=True)
    gpu = report["gpu"].lower().replace("nvidia", "").strip().replace(" ", "-")
    path = args.json_dir / f"gpu-check-{gpu}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    failed = [r["path"] for r in report["agreement"] if not r["ok"]]
    failed += [
        f"end to end ({run['backend']})"
        for run in report.get("end_to_end", [])
        if not run["metrics_count_ok"]
    ]
    if failed:
        print(f"gpu-check FAILED: {', '.join(failed)}")
        return 1
    return 0


def model_figures(
    report: dict[str, Any], repo: Path, args: argparse.Namespace, trt_cache: Path
) -> None:
    """The SDPA probe, the folded-attention A/B and model-only img/s, into `report`."""
    report["sdpa"] = sdpa_probe()
    print(f"\nSDPA probe: {report['sdpa']}")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    report["folded_attention"] = folded_attention_ab(repo, sizes, args.seconds)
    print(f"\nmask units folded (model.attention) vs timm's 5-D attention, eager fp16, img/s: "
          f"{report['folded_attention']}")  # fmt: skip
    report["model_only"] = [
        model_only(repo, path, sizes, args.seconds, trt_cache)
        # fp16: eager, TorchScript, ONNX Runtime CUDA, TensorRT (torch first: it needs no
        # extra runtime, so a host without onnxruntime-gpu still gets figures)
        for path in (GPU_PATHS[5], GPU_PATHS[4], GPU_PATHS[1], GPU_PATHS[3])
    ]
    _print_model_only(report["model_only"])


def check_paths(
    repo: Path,
    device: str,
    paths: Sequence[GpuPath],
    photos: dict[str, bytes],
    trt_cache: Path,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Run every path on `photos` and compare it with ONNX Runtime fp32 on the CPU."""
    reference, _ = _outputs(repo, REFERENCE, "cpu", photos, trt_cache, batch_size)
    results = []
    for path in paths:
        started = time.perf_counter()
        try:
            outputs, _ = _outputs(repo, path, device, photos, trt_cache, batch_size)
        except Exception as exc:  # report it and go on: the next path may still work
            results.append({"path": path.name, "ok": False, "error": _error(exc)})
            continue
        row = {"path": path.name, **agreement(reference, outputs, path.precision)}
        row["worst_photos"] = worst_photos(reference, outputs, list(photos))
        row["seconds"] = round(time.perf_counter() - started, 2)
        results.append(row)
    return results


def agreement(
    reference: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], precision: str
) -> dict[str, Any]:
    """Embedding cosine and top-k agreement of `got` against `reference`, with a verdict."""
    (ref_logits, ref_emb), (logits, emb) = reference, got
    cosine = _cosines(ref_emb, emb)
    pairs = zip(_top(ref_logits, 5), _top(logits, 5), strict=True)
    top5 = float(np.mean([set(a) == set(b) for a, b in pairs]))
    top1 = float(np.mean(_top(ref_logits, 1)[:, 0] == _top(logits, 1)[:, 0]))
    ok = bool(float(cosine.min()) >= MIN_COSINE[precision])
    if precision == "fp32":  # with random weights, reduced precision can reorder close logits
        ok = ok and top5 >= 0.99
    return {
        "ok": ok,
        "images": len(emb),
        "cosine_min": round(float(cosine.min()), 6),
        "cosine_mean": round(float(cosine.mean()), 6),
        "top1_agreement": round(top1, 4),
        "top5_agreement": round(top5, 4),
    }


def worst_photos(
    reference: tuple[np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray],
    names: Sequence[str],
    count: int = 3,
) -> dict[str, float]:
    """The photos whose embeddings agree least, by name, with their cosine."""
    cosine = _cosines(reference[1], got[1])
    return {names[i]: round(float(cosine[i]), 6) for i in np.argsort(cosine)[:count]}


def _cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] embedding arrays."""
    return (reference * got).sum(1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(got, axis=1)
    )


def sdpa_probe(batch: int = 64) -> dict[str, Any]:
    """Time Hiera-B's first-stage attention as 5-D (as timm runs it) and flattened to 4-D."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Hiera-B stage 1: 1 head of 96 channels, 64 mask units of 49 tokens ([B, heads, MU, T, C]).
    shape5 = (batch, 1, 64, 49, 96)
    q, k, v = (torch.randn(shape5, device="cuda", dtype=torch.float16) for _ in range(3))
    # Mask units as heads: the same math in the layout the fused kernels take.
    four = tuple(t.reshape(batch, 64, 49, 96) for t in (q, k, v))
    result: dict[str, Any] = {"shape_5d": list(shape5)}
    fused = F.scaled_dot_product_attention(four[0], four[1], four[2])
    diff = (F.scaled_dot_product_attention(q, k, v).reshape(fused.shape) - fused).abs().max()
    result["max_abs_diff_4d_vs_5d"] = float(diff)
    for name, tensors, backends in (
        ("5d_default", (q, k, v), None),
        ("4d_default", four, None),
        ("4d_flash", four, [SDPBackend.FLASH_ATTENTION]),
        ("4d_efficient", four, [SDPBackend.EFFICIENT_ATTENTION]),
    ):
        try:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                result[f"{name}_ms"] = round(_time_cuda(F.scaled_dot_product_attention, tensors), 4)
        except RuntimeError as exc:
            result[f"{name}_ms"] = f"unavailable: {str(exc)[:120]}"
    return result


def model_only(
    repo: Path, path: GpuPath, batch_sizes: Sequence[int], seconds: float, trt_cache: Path
) -> dict[str, Any]:
    """Images/s of backend.infer on a batch already on the GPU (no decode, no HTTP)."""
    import torch

    rows: dict[str, Any] = {"path": path.name}
    for size in batch_sizes:
        try:
            backend, feeder, _ = _open(repo, path, "cuda:0", size, trt_cache)
            crops = [np.zeros(feeder.input_shape, np.uint8)] * size
            batch = feeder(crops)
            backend.infer(batch)  # the TensorRT engine / autotuning happen here, untimed
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                backend.infer(batch)
                count += 1
            torch.cuda.synchronize()
            rows[f"batch_{size}_img_per_s"] = round(size * count / (time.perf_counter() - started))
            backend.close()
        except Exception as exc:
            rows[f"batch_{size}_img_per_s"] = f"failed: {_error(exc)}"
    return rows


def end_to_end(
    repo: Path,
    args: argparse.Namespace,
    trt_cache: Path,
    backend: str,
    decode: str = "cuda",
    *,
    engine: str = "inline",
    workers: int = 2,
) -> dict[str, Any]:
    """A real hiera-serve on the GPU, driven by closed-loop clients in several processes;
    with `engine` process, one engine process and `workers` front ends."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "service.cli", "--model-repository", str(repo),
        "--backend", backend, "--precision", "fp16", "--device", "cuda",
        "--decode-device", decode, "--max-batch-size", "128", "--max-delay-ms", "2",
        "--max-queue-size", "8192", "--trt-cache-dir", str(trt_cache),
        "--port", str(port), "--log-level", "warning", "--engine", engine,
        "--workers", str(workers),
    ]  # fmt: skip
    server = subprocess.Popen(command, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    image = resized_jpeg(500, 375)
    launched = time.perf_counter()
    try:
        _wait_ready(url, server)
        ready_s = time.perf_counter() - launched
        before = asyncio.run(_scrape(url))
        per_process = max(1, args.concurrency // args.client_processes)
        roles = process_roles(server.pid)
        cpu_before = {role: sum(map(cpu_seconds, pids)) for role, pids in roles.items()}
        started = time.perf_counter()
        with ProcessPoolExecutor(args.client_processes) as pool:
            parts = list(
                pool.map(
                    _client_process,
                    *zip(
                        *[(url, image, per_process, args.seconds)] * args.client_processes,
                        strict=True,
                    ),
                )
            )
        elapsed = time.perf_counter() - started
        cpu_used = {
            role: sum(map(cpu_seconds, pids)) - cpu_before[role] for role, pids in roles.items()
        }
        counted = _classified(url)
        stages = stage_delta(before, asyncio.run(_scrape(url)))
    finally:
        server.terminate()
        server.wait(120)
    latencies = [s for part in parts for s in part[0]]
    ok = sum(part[1] for part in parts)
    return {
        # One scrape of one worker must count every worker's answers (multiprocess metrics).
        "metrics_count_ok": counted == ok,
        "metrics_counted": counted,
        "backend": f"{backend} fp16",
        "decode": decode,
        "ready_s": round(ready_s, 1),
        "image": "500x375 JPEG",
        "concurrency": per_process * args.client_processes,
        "engine": engine,
        "workers": workers,
        "requests": len(latencies),
        "ok": ok,
        "images_per_s": round(ok / elapsed, 1),
        # Cores each role kept busy, and its CPU milliseconds per answered image.
        "cores_by_role": {role: round(s / elapsed, 2) for role, s in cpu_used.items()},
        "cpu_ms_per_image_by_role": {
            role: round(1e3 * s / max(ok, 1), 3) for role, s in cpu_used.items()
        },
        "latency_ms": percentiles(latencies),
        **stages,  # the servers' own stage means: where the time went
    }


async def _scrape(url: str) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await scrape(client)


def _classified(url: str) -> float:
    """Return hiera_requests_total{endpoint="classify",status="200"} from one scrape."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "hiera_requests_total"
        and sample.labels == {"endpoint": "classify", "status": "200"}
    )


def _client_process(url: str, image: bytes, concurrency: int, seconds: float) -> tuple[
        list[float], int]:  # fmt: skip
    return asyncio.run(_clients(url, image, concurrency, seconds))


async def _clients(url: str, image: bytes, concurrency: int, seconds: float) -> tuple[
        list[float], int]:  # fmt: skip
    import httpx

    latencies: list[float] = []
    ok = 0
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        stop = time.perf_counter() + seconds

        async def one_client() -> None:
            nonlocal ok
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                reply = await client.post(
                    "/v1/classify", content=image, headers={"Content-Type": "image/jpeg"}
                )
                latencies.append(time.perf_counter() - t0)
                ok += reply.status_code == 200

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies, ok


def _outputs(
    repo: Path,
    path: GpuPath,
    device: str,
    photos: dict[str, bytes],
    trt_cache: Path,
    batch_size: int,
) -> tuple[tuple[np.ndarray, np.ndarray], Preprocessing]:
    backend, feeder, pp = _open(repo, path, device, batch_size, trt_cache)
    try:
        if path.device_decode:
            from service.imaging.device import TensorDecoder

            decoder = TensorDecoder(pp, device, max_pixels=10**9)
            crops: list[Any] = decoder.decode_batch(list(photos.values())).crops
            failed = [c for c in crops if isinstance(c, Exception)]
            if failed:
                raise RuntimeError(f"device decode refused {len(failed)} photos: {failed[0]}")
        else:
            full = [cpu.decode_image(data, max_pixels=10**9) for data in photos.values()]
            crops = [cpu.crop(decoded.image, pp) for decoded in full]
        logits, embeddings = [], []
        for start in range(0, len(crops), batch_size):
            out = backend.infer(feeder(crops[start : start + batch_size]))
            logits.append(out[0])
            embeddings.append(out[1])
        return (np.concatenate(logits), np.concatenate(embeddings)), pp
    finally:
        backend.close()


def _open(
    repo: Path,
    path: GpuPath,
    device: str,
    max_batch_size: int,
    trt_cache: Path,
    **overrides: Any,
) -> tuple[Any, Feeder, Preprocessing]:
    """Return (backend, feeder, preprocessing) for `path`'s first instance; `overrides` are
    further Settings fields."""
    settings = Settings(
        **{
            "model_repository": repo,
            "backend": path.backend,
            "precision": path.precision,
            "device": "cpu" if device == "cpu" else "cuda",
            "onnx_providers": list(path.providers) if path.providers else None,
            "max_batch_size": max_batch_size,
            "trt_cache_dir": trt_cache,
            "tf32": False,  # compare true fp32 with fp32
            "decode_device": "cpu",
        }
        | overrides
    )
    load_plan = plan(settings)
    instance_device, factory = load_plan.instances[0]  # cuda:0, or the CPU
    backend = factory()
    pp = load_plan.card.preprocessing
    inputs = InputSpec((3, *pp.input_size), pp.mean, pp.std)
    return backend, feeder_for(backend, instance_device, inputs, max_batch_size), pp


def _export(variant: str, out: Path) -> Path:
    from model.artifacts import ModelRepository, RepositoryError
    from model.export import export_repository
    from model.hiera import build

    target = out / variant
    if (target / "manifest.json").is_file():
        try:
            return ModelRepository.load(target).path  # reuse an export that still verifies
        except RepositoryError as exc:
            print(f"re-exporting {variant}: {exc}")
    print(f"exporting {variant} (random weights: speed and agreement do not depend on them)")
    built = build(variant, "random", seed=0)
    return export_repository(
        built, out, formats=("onnx", "onnx_fp16", "torchscript"), overwrite=True
    )


def folded_attention_ab(repo: Path, batch_sizes: Sequence[int], seconds: float) -> dict[str, Any]:
    """Eager fp16 img/s with the mask units folded (as served) and with timm's 5-D attention."""
    import torch
    from timm.models.hiera import MaskUnitAttention

    from model.artifacts import ModelRepository
    from model.attention import FoldedMaskUnitAttention
    from model.hiera import build

    manifest = ModelRepository.load(repo, verify=False).manifest
    module = build(manifest.variant.name, "random").module.cuda()  # speed ignores the weights
    height, width = manifest.preprocessing.input_size
    folded: list[Any] = [m for m in module.modules() if isinstance(m, FoldedMaskUnitAttention)]
    result: dict[str, Any] = {"layers": len(folded)}
    kinds: tuple[tuple[str, type[MaskUnitAttention]], ...] = (
        ("timm_5d", MaskUnitAttention),
        ("folded", FoldedMaskUnitAttention),
    )
    for size in batch_sizes:
        batch = torch.randn(size, 3, height, width, device="cuda")
        for rnd in range(2):  # alternate, so both see the same clocks
            for name, cls in kinds:
                for layer in folded:
                    layer.__class__ = cls
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    module(batch)
                    torch.cuda.synchronize()
                    count, started = 0, time.perf_counter()
                    while time.perf_counter() - started < seconds / 2:
                        module(batch)
                        count += 1
                    torch.cuda.synchronize()
                rate = round(size * count / (time.perf_counter() - started))
                result[f"batch_{size}_{name}_{rnd}"] = rate
    return result


def _error(exc: BaseException) -> str:
    """The exception's type and the end of its message, where TorchScript puts the cause."""
    text = str(exc)
    return f"{type(exc).__name__}: {text if len(text) <= 900 else '...' + text[-900:]}"


def _top(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def _time_cuda(fn: Any, tensors: Sequence[Any], repeats: int = 50) -> float:
    import torch

    for _ in range(5):
        fn(*tensors)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(*tensors)
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / repeats


def _print_agreement(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'path':34} {'ok':>3} {'cos min':>9} {'cos mean':>9} {'top1':>6} {'top5':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:34} {'NO':>3}  {r['error'][:150]}")
            continue
        verdict = "yes" if r["ok"] else "NO"
        print(f"{r['path']:34} {verdict:>3} {r['cosine_min']:9.6f} {r['cosine_mean']:9.6f} "
              f"{r['top1_agreement']:6.3f} {r['top5_agreement']:6.3f}")  # fmt: skip


def _print_model_only(rows: list[dict[str, Any]]) -> None:
    print("\nmodel only (batch already on the GPU), img/s:")
    for r in rows:
        cells = "  ".join(f"{k.replace('_img_per_s', '')}={v}" for k, v in r.items() if k != "path")
        print(f"  {r['path']:24} {cells}")


if __name__ == "__main__":
    sys.exit(main())
