"""Decide which devices the pool places instances on, and say why."""

from __future__ import annotations

import logging

from service.runtime.base import BackendError
from service.settings import BackendName, DeviceName

log = logging.getLogger(__name__)


def cuda_device_count() -> int:
    """Return how many CUDA devices torch can see (0 without a driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def runtime_gpu_support(backend: BackendName, onnx_providers: list[str] | None = None) -> str:
    """Return "" if `backend` as installed can run on a GPU, else the reason it cannot."""
    if backend != "onnx":
        return ""  # torch found the GPU, and the torch backends run on whatever torch sees
    import onnxruntime as ort

    from service.runtime.providers import GPU_PROVIDERS

    available = set(ort.get_available_providers())
    if onnx_providers:
        available &= set(onnx_providers)
    if available & GPU_PROVIDERS:
        return ""
    return (
        f"the installed ONNX Runtime offers only {sorted(available)} (the CPU-only "
        "'onnxruntime' wheel, or --onnx-providers without CUDA/TensorRT); install "
        "hiera-serve[gpu] (onnxruntime-gpu) to serve on the GPU"
    )


def resolve_devices(
    device: DeviceName, cuda_count: int | None = None, gpu_unusable: str = ""
) -> list[str]:
    """Return the device strings to serve on: every visible GPU, or the CPU.

    `auto` means the best device the installed runtime can actually use: with GPUs visible
    but a runtime that cannot use them (`gpu_unusable` says why), it serves on the CPU and
    logs the reason; `cuda` refuses instead.
    """
    count = cuda_device_count() if cuda_count is None else cuda_count
    if device == "cpu":
        log.info("device: cpu (as configured)")
        return ["cpu"]
    if count == 0:
        if device == "auto":
            log.info("device auto: cpu (no CUDA device visible to torch)")
            return ["cpu"]
        raise BackendError(
            "--device cuda was requested but no CUDA device is visible; check the driver and "
            "CUDA_VISIBLE_DEVICES, or use --device auto to fall back to the CPU"
        )
    if gpu_unusable:
        if device == "cuda":
            raise BackendError(f"--device cuda: {count} GPU(s) visible, but {gpu_unusable}")
        log.warning("device auto: cpu, although %d GPU(s) are visible: %s", count, gpu_unusable)
        return ["cpu"]
    devices = [f"cuda:{i}" for i in range(count)]
    log.info("device %s: %s (%d CUDA device(s) visible)", device, ", ".join(devices), count)
    return devices


def cuda_uuids(devices: list[str]) -> dict[str, str]:
    """Map each CUDA device served on to its GPU UUID in NVML's spelling ("GPU-...")."""
    import torch

    uuids = {}
    for device in devices:
        if device.startswith("cuda"):
            uuid = str(torch.cuda.get_device_properties(torch.device(device)).uuid)
            uuids[device] = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return uuids
