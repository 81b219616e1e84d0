"""A stand-in for NVML with one healthy GPU, put first on a test server's PYTHONPATH.

It lets a CPU-only machine serve the GPU gauges through the real collector code, so the dashboard
and Prometheus checks see every series a GPU host exports. Anything NVML has that this fake does
not raises AttributeError naming it, so a collector that starts using more of NVML fails loudly.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

UUID = "GPU-8a3c2f10-5b7e-4d21-9c0e-1f2a3b4c5d6e"
UTILIZATION_PERCENT = 42
MEMORY_TOTAL = 80 * 2**30
MEMORY_USED = 3 * 2**30


class NVMLError(Exception):
    """NVML's error type."""


def nvmlInit() -> None:
    return None


def nvmlShutdown() -> None:
    return None


def nvmlSystemGetDriverVersion() -> str:
    return "580.95.05"


def nvmlDeviceGetCount() -> int:
    return 1


def _check(index: int) -> int:
    if index != 0:
        raise NVMLError(f"invalid GPU index {index}")
    return index


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    return _check(index)


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> int:
    text = uuid.decode() if isinstance(uuid, bytes) else uuid
    if text != UUID:
        raise NVMLError(f"no GPU with UUID {text}")
    return 0


def nvmlDeviceGetIndex(handle: int) -> int:
    return _check(handle)


def nvmlDeviceGetUUID(handle: int) -> str:
    _check(handle)
    return UUID


def nvmlDeviceGetName(handle: int) -> str:
    _check(handle)
    return "NVIDIA H100 80GB HBM3"


def nvmlDeviceGetPciInfo(handle: int) -> SimpleNamespace:
    _check(handle)
    return SimpleNamespace(busId="00000000:01:00.0", bus=1, device=0, domain=0)


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    _check(handle)
    return SimpleNamespace(gpu=UTILIZATION_PERCENT, memory=10)


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    _check(handle)
    return SimpleNamespace(total=MEMORY_TOTAL, used=MEMORY_USED, free=MEMORY_TOTAL - MEMORY_USED)


def __getattr__(name: str) -> Any:
    raise AttributeError(f"the fake pynvml in tests/deploy/fake_nvml lacks {name}; add it there")
