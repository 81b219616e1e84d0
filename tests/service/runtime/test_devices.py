"""`--device auto` picks the best device the installed runtime can really use, and says why."""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest

from service.runtime.base import BackendError
from service.runtime.devices import resolve_devices, runtime_gpu_support
from service.runtime.providers import CPU, CUDA


def test_cpu_only_onnxruntime_cannot_use_a_gpu() -> None:
    assert CUDA not in ort.get_available_providers()  # the cpu extra, as installed here
    assert "onnxruntime-gpu" in runtime_gpu_support("onnx")


def test_torch_backends_use_whatever_torch_sees() -> None:
    assert runtime_gpu_support("eager") == ""
    assert runtime_gpu_support("torchscript") == ""


def test_a_gpu_onnxruntime_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert runtime_gpu_support("onnx") == ""
    # ... unless the operator narrowed the providers to the CPU.
    assert "onnxruntime-gpu" in runtime_gpu_support("onnx", [CPU])


def test_auto_with_a_visible_gpu_and_a_cpu_only_runtime_serves_on_cpu_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="service.runtime.devices"):
        devices = resolve_devices("auto", cuda_count=1, gpu_unusable=runtime_gpu_support("onnx"))

    assert devices == ["cpu"]
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 GPU(s) are visible" in record.getMessage()
    assert "hiera-serve[gpu]" in record.getMessage()


def test_cuda_with_a_cpu_only_runtime_refuses() -> None:
    with pytest.raises(BackendError, match=r"--device cuda: 2 GPU\(s\) visible, but"):
        resolve_devices("cuda", cuda_count=2, gpu_unusable=runtime_gpu_support("onnx"))


def test_auto_logs_the_gpus_it_serves_on(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.runtime.devices"):
        assert resolve_devices("auto", cuda_count=2) == ["cuda:0", "cuda:1"]
    assert "device auto: cuda:0, cuda:1 (2 CUDA device(s) visible)" in caplog.text
