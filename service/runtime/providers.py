"""ONNX Runtime execution providers: which to ask for, with what options, and proof we got them.

ONNX Runtime's Python session quietly retries with fallback providers when the CUDA or TensorRT
provider cannot start (a missing libnvinfer or cuDNN, a CUDA major mismatch) and drops every
option on the way, so an instance asked to run on `cuda:1` with TensorRT can end up on the CPU
with only a line on stdout. Everything here exists so that never happens silently: the options
are spelled out, and `verify` compares what the session runs with what was asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.runtime.base import BackendError

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Fastest first; ORT assigns each node to the first provider in the list that can run it.
PREFERRED = (TENSORRT, CUDA, CPU)
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})

# What each GPU provider needs besides onnxruntime-gpu; named in the error when one fails.
_NEEDS = {
    TENSORRT: "TensorRT (libnvinfer, e.g. the tensorrt-cu13 wheel) plus everything CUDA needs",
    CUDA: "the CUDA runtime, cuBLAS and cuDNN 9 of the CUDA major onnxruntime-gpu was built for "
    "(the nvidia-*-cu13 wheels that torch installs, or a CUDA base image)",
}


@dataclass(frozen=True)
class GpuOptions:
    """How GPU providers are configured; every field is stated, none left to ORT's defaults."""

    tf32: bool = True
    mem_limit_bytes: int = 0  # 0: no limit beyond the card's memory
    trt_cache_dir: Path | None = None
    trt_fp16: bool = False
    cuda_graph: bool = False  # the first GPU provider captures graphs (service.runtime.onnx)
    device_top_k: int | None = None  # with graphs, rank this many classes on the device
    max_batch_size: int = 8
    input_name: str = "images"
    input_shape: tuple[int, int, int] = (3, 224, 224)


def choose_providers(
    device: str, available: Sequence[str], requested: Sequence[str] | None = None
) -> list[str]:
    """Return the providers to use on `device`, in priority order, validated against ORT."""
    wanted = list(requested) if requested else list(PREFERRED)
    if device == "cpu":
        wanted = [p for p in wanted if p not in GPU_PROVIDERS]
    missing = [p for p in wanted if p not in available] if requested else []
    if missing:
        raise BackendError(
            f"ONNX Runtime providers {missing} are not available in this build (available: "
            f"{list(available)}); install onnxruntime-gpu for CUDA/TensorRT"
        )
    chosen = [p for p in wanted if p in available]
    if device.startswith("cuda") and not GPU_PROVIDERS & set(chosen):
        raise BackendError(
            f"device {device} needs the CUDA or TensorRT provider, but ONNX Runtime offers "
            f"{list(available)}; install the hiera-serve[gpu] extra (onnxruntime-gpu)"
        )
    if CPU not in chosen:
        chosen.append(CPU)  # the universal fallback for nodes a GPU provider cannot run
    return chosen


def provider_options(provider: str, device_id: int, gpu: GpuOptions) -> dict[str, str]:
    """Return the option strings ORT takes for `provider` on CUDA device `device_id`."""
    if provider == CUDA:
        options = {
            "device_id": str(device_id),
            # Grow the arena by what is asked: fixed serving shapes need no power-of-two slack.
            "arena_extend_strategy": "kSameAsRequested",
            # Hiera's only convolution is the patch embedding: the heuristic pick is enough
            # and keeps start-up short.
            "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": "1",
            "use_tf32": "1" if gpu.tf32 else "0",
        }
        if gpu.mem_limit_bytes:
            options["gpu_mem_limit"] = str(gpu.mem_limit_bytes)
        return options
    if provider == TENSORRT:
        channels, height, width = gpu.input_shape

        def shape(batch: int) -> str:
            return f"{gpu.input_name}:{batch}x{channels}x{height}x{width}"

        # One profile covering every batch the batcher can send: warm-up at sizes 1..max then
        # builds one engine, instead of a rebuild each time a larger batch arrives.
        options = {
            "device_id": str(device_id),
            "trt_fp16_enable": "1" if gpu.trt_fp16 else "0",
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(gpu.max_batch_size),
            "trt_profile_max_shapes": shape(gpu.max_batch_size),
        }
        if gpu.trt_cache_dir is not None:
            cache = str(gpu.trt_cache_dir)
            options |= {
                "trt_engine_cache_enable": "1",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "1",
                "trt_timing_cache_path": cache,
            }
        return options
    return {}


def graph_provider(chosen: Sequence[str]) -> str | None:
    """Return the provider that captures CUDA graphs: the first GPU one (None on the CPU).

    Only one: ONNX Runtime replays the graph of one provider, which must own every node.
    """
    return next((p for p in chosen if p in GPU_PROVIDERS), None)


def graph_options(provider: str) -> dict[str, str]:
    """Return the options that turn CUDA graph capture on for GPU provider `provider`."""
    if provider == CUDA:
        return {"enable_cuda_graph": "1"}
    if provider == TENSORRT:
        return {"trt_cuda_graph_enable": "1"}
    raise ValueError(f"{provider} cannot capture CUDA graphs")


def verify(
    chosen: Sequence[str],
    active: Sequence[str],
    active_options: Mapping[str, Mapping[str, str]],
    device_id: int,
    startup_log: str = "",
) -> None:
    """Refuse a session whose providers or GPU differ from what was asked for."""
    lost = [p for p in chosen if p not in active]
    if lost:
        needs = "; ".join(f"{p} needs {_NEEDS[p]}" for p in lost if p in _NEEDS)
        said = _ort_error_lines(startup_log)
        raise BackendError(
            f"ONNX Runtime could not start {', '.join(lost)} (running only {list(active)})"
            + (f": {said}" if said else "")
            + (f". {needs}" if needs else "")
            + "; refusing to serve on a fallback. Fix the installation, or pass "
            "--onnx-providers / --device cpu to choose another runtime explicitly"
        )
    for provider in GPU_PROVIDERS & set(chosen):
        got = active_options.get(provider, {}).get("device_id")
        if got is not None and got != str(device_id):
            raise BackendError(
                f"{provider} runs on GPU {got}, not on the requested GPU {device_id}; "
                "check CUDA_VISIBLE_DEVICES"
            )


def _ort_error_lines(text: str) -> str:
    """Keep what ORT printed about the failed provider (e.g. which .so it could not open)."""
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return " | ".join(lines)[:600]
