"""Decide which devices the pool places instances on."""

from __future__ import annotations

from service.runtime.base import BackendError
from service.settings import DeviceName


def cuda_device_count() -> int:
    """Return how many CUDA devices torch can see (0 without a driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(device: DeviceName, cuda_count: int | None = None) -> list[str]:
    """Return the device strings to serve on: every visible GPU, or the CPU."""
    count = cuda_device_count() if cuda_count is None else cuda_count
    if device == "cpu" or (device == "auto" and count == 0):
        return ["cpu"]
    if count == 0:
        raise BackendError(
            "--device cuda was requested but no CUDA device is visible; check the driver and "
            "CUDA_VISIBLE_DEVICES, or use --device auto to fall back to the CPU"
        )
    return [f"cuda:{i}" for i in range(count)]
