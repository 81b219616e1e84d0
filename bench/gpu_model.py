"""GPU model-only figures for `make gpu-check`: CUDA graphs, TensorRT, torch.compile.

Hiera-B fp16 (and fp32 where ONNX Runtime runs it) images/s at each batch size, a batch
already on the GPU, for eager and TorchScript with and without CUDA graphs, ONNX Runtime's CUDA
provider with and without `enable_cuda_graph`, TensorRT, and torch.compile as a data point;
then whether graphed runs give the un-graphed bits on real photos. A path that fails reports
its error in its row instead of ending the check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_check import _error, _open
from service.imaging import Preprocessing, cpu
from service.runtime.feed import Feeder
from service.runtime.providers import CUDA, TENSORRT
from service.settings import BackendName, Precision

# Inductor's default mode: compiled kernels alone (graphs are rows of their own), and no
# autotuning, which takes many minutes on Hiera-B and would not fit a short GPU lease.
COMPILE_MODE = "default"
# Each timing: a few seconds at thousands of img/s is tens of thousands of images.
MAX_SECONDS = 3.0


@dataclass(frozen=True)
class ModelPath:
    """One way to run the model on the GPU."""

    name: str
    backend: BackendName
    precision: Precision
    graphs: bool = False
    providers: tuple[str, ...] | None = None
    compile: bool = False


MODEL_PATHS = (
    ModelPath("eager-fp16", "eager", "fp16"),
    ModelPath("eager-fp16+graphs", "eager", "fp16", graphs=True),
    ModelPath("torchscript-fp16", "torchscript", "fp16"),
    ModelPath("torchscript-fp16+graphs", "torchscript", "fp16", graphs=True),
    ModelPath("onnx-cuda-fp16", "onnx", "fp16", providers=(CUDA,)),
    ModelPath("onnx-cuda-fp16+graphs", "onnx", "fp16", graphs=True, providers=(CUDA,)),
    ModelPath("onnx-cuda-fp32", "onnx", "fp32", providers=(CUDA,)),
    ModelPath("onnx-cuda-fp32+graphs", "onnx", "fp32", graphs=True, providers=(CUDA,)),
    ModelPath("onnx-tensorrt-fp16", "onnx", "fp16", providers=(TENSORRT, CUDA)),
    ModelPath("onnx-tensorrt-fp32", "onnx", "fp32", providers=(TENSORRT, CUDA)),
    ModelPath("eager-fp16+compile", "eager", "fp16", compile=True),
)
# Graphed against un-graphed on photos: the paths that serve with graphs.
IDENTITY_PATHS = tuple(p for p in MODEL_PATHS if p.graphs)


def figures(
    repo: Path, batch_sizes: str, seconds: float, trt_cache: Path, photos: dict[str, bytes]
) -> dict[str, Any]:
    """Measure every model path and the graphed runs' bit-identity; print both tables."""
    sizes = [int(b) for b in batch_sizes.split(",")]
    throughput = [
        measured(
            path.name,
            sizes,
            partial(rate, repo, path, seconds=min(seconds, MAX_SECONDS), trt_cache=trt_cache),
        )
        for path in MODEL_PATHS
    ]
    print("\nmodel only with CUDA graphs / TensorRT / torch.compile, img/s:")
    for row in throughput:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
    identity = [graphed_identity(repo, path, photos, trt_cache) for path in IDENTITY_PATHS]
    print("\ngraphed vs un-graphed on photos:")
    for row in identity:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
    return {"throughput": throughput, "graphed_identity": identity}


def measured(name: str, sizes: Sequence[int], measure: Callable[[int], float]) -> dict[str, Any]:
    """Return one row: `measure(size)` img/s per batch size, or why it failed."""
    row: dict[str, Any] = {"path": name}
    for size in sizes:
        try:
            row[f"batch_{size}_img_per_s"] = round(measure(size))
        except Exception as exc:  # report it: the other paths may still work
            row[f"batch_{size}_img_per_s"] = f"failed: {_error(exc)}"
    return row


def compared(
    name: str, reference: Sequence[np.ndarray], got: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Return one row: whether `got` has `reference`'s bits, and the largest difference."""
    same = all(np.array_equal(a, b) for a, b in zip(reference, got, strict=True))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, got, strict=True))
    return {"path": name, "images": len(reference[0]), "bit_identical": same, "max_abs_diff": diff}


def rate(repo: Path, path: ModelPath, size: int, *, seconds: float, trt_cache: Path) -> float:
    """Images/s of `path` at batch `size` over about `seconds`, the batch already on the GPU."""
    import torch

    backend, feeder, _ = open_backend(repo, path, size, trt_cache)
    try:
        batch = feeder([np.zeros(feeder.input_shape, np.uint8)] * size)
        for _ in range(3):  # TensorRT's engine, autotuning, torch.compile: untimed
            backend.infer(batch)
        torch.cuda.synchronize()
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            backend.infer(batch)
            count += 1
        torch.cuda.synchronize()
        return size * count / (time.perf_counter() - started)
    finally:
        backend.close()


def graphed_identity(
    repo: Path, path: ModelPath, photos: dict[str, bytes], trt_cache: Path, batch_size: int = 16
) -> dict[str, Any]:
    """Run `photos` through `path` with and without graphs; compare the outputs bit for bit."""
    try:
        plain = _photo_outputs(repo, ModelPath(path.name, path.backend, path.precision,
                                               providers=path.providers),
                               photos, trt_cache, batch_size)  # fmt: skip
        graphed = _photo_outputs(repo, path, photos, trt_cache, batch_size)
    except Exception as exc:
        return {"path": path.name, "error": _error(exc)}
    return compared(path.name, plain, graphed)


def open_backend(
    repo: Path, path: ModelPath, max_batch_size: int, trt_cache: Path
) -> tuple[Any, Feeder, Preprocessing]:
    """Return (backend, feeder, preprocessing) for `path` on cuda:0, graphs captured if any."""
    backend, feeder, pp = _open(
        repo, path, "cuda:0", max_batch_size, trt_cache,  # type: ignore[arg-type]
        tf32=True, cuda_graphs=path.graphs, onnx_cuda_graphs=path.graphs,
    )  # fmt: skip
    if path.compile:
        import torch

        # The backend's module, compiled in place: the same precast weights and autocast.
        backend._module = torch.compile(backend._module, mode=COMPILE_MODE)
    if path.graphs:
        backend.prepare(max_batch_size, feeder.input_shape)
        if not backend.cuda_graphs:
            raise RuntimeError("graph capture failed (see the log); the row would be un-graphed")
    return backend, feeder, pp


def _photo_outputs(
    repo: Path, path: ModelPath, photos: dict[str, bytes], trt_cache: Path, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    backend, feeder, pp = open_backend(repo, path, batch_size, trt_cache)
    try:
        crops = [cpu.crop(cpu.decode_image(d, max_pixels=10**9).image, pp) for d in photos.values()]
        outputs = [backend.infer(feeder(crops[i : i + batch_size]))
                   for i in range(0, len(crops), batch_size)]  # fmt: skip
        return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])
    finally:
        backend.close()
