"""ONNX Runtime providers: explicit options, and no silent fallback to another device."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
import pytest

import service.runtime.onnx as onnx_module
from service.runtime import providers as ep
from service.runtime.base import BackendError
from service.runtime.onnx import OnnxBackend

GPU = ep.GpuOptions(
    tf32=False,
    mem_limit_bytes=4 << 30,
    trt_cache_dir=Path("/cache/trt"),
    trt_fp16=True,
    max_batch_size=32,
    input_shape=(3, 224, 224),
)


def test_cuda_options_name_the_device_and_state_every_choice() -> None:
    options = ep.provider_options(ep.CUDA, 3, GPU)

    assert options == {
        "device_id": "3",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "do_copy_in_default_stream": "1",
        "use_tf32": "0",
        "gpu_mem_limit": str(4 << 30),
    }
    assert "gpu_mem_limit" not in ep.provider_options(ep.CUDA, 0, ep.GpuOptions())
    assert ep.provider_options(ep.CUDA, 0, ep.GpuOptions())["use_tf32"] == "1"


def test_tensorrt_gets_one_profile_for_every_batch_size_and_persistent_caches() -> None:
    options = ep.provider_options(ep.TENSORRT, 1, GPU)

    assert options["device_id"] == "1"
    assert options["trt_fp16_enable"] == "1"
    assert options["trt_profile_min_shapes"] == "images:1x3x224x224"
    assert options["trt_profile_opt_shapes"] == "images:32x3x224x224"
    assert options["trt_profile_max_shapes"] == "images:32x3x224x224"
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "1"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == "/cache/trt"


def test_cpu_provider_takes_no_options() -> None:
    assert ep.provider_options(ep.CPU, 0, GPU) == {}


def test_verify_accepts_what_was_asked_for() -> None:
    ep.verify([ep.CUDA, ep.CPU], [ep.CUDA, ep.CPU], {ep.CUDA: {"device_id": "1"}}, 1)


def test_verify_refuses_a_fallback_and_names_the_missing_library() -> None:
    printed = (
        "EP Error /onnxruntime/core/session/provider_bridge_ort.cc: Failed to load library "
        "libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot open shared object "
        "file\nFalling back to ['CPUExecutionProvider'] and retrying."
    )
    with pytest.raises(BackendError) as info:
        ep.verify([ep.CUDA, ep.CPU], [ep.CPU], {}, 0, printed)

    message = str(info.value)
    assert "could not start CUDAExecutionProvider" in message
    assert "libcudnn.so.9" in message
    assert "cuDNN" in message  # what the provider needs
    assert "refusing to serve on a fallback" in message


def test_verify_refuses_the_wrong_gpu() -> None:
    with pytest.raises(BackendError, match="runs on GPU 0, not on the requested GPU 1"):
        ep.verify([ep.CUDA, ep.CPU], [ep.CUDA, ep.CPU], {ep.CUDA: {"device_id": "0"}}, 1)


def test_cpu_session_reports_the_provider_in_use(micro_repository: Path) -> None:
    backend = OnnxBackend(micro_repository / "model.onnx", device="cpu", precision="fp32")
    assert backend.provider == ep.CPU
    assert backend.input_dtype == "float32"


class FallingBackSession:
    """Behaves like ORT's session when the CUDA provider cannot load: prints, then CPU only."""

    created: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, path: str, options: Any, providers: list[str], provider_options: Any):
        FallingBackSession.created.append(dict(zip(providers, provider_options, strict=True)))
        print("EP Error libcublasLt.so.13: cannot open shared object file")
        print("Falling back to ['CPUExecutionProvider'] and retrying.")

    def get_providers(self) -> list[str]:
        return [ep.CPU]

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {ep.CPU: {}}


class FakeStream:
    cuda_stream = 1234


def test_gpu_backend_refuses_to_start_on_a_silent_cpu_fallback(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ep.CUDA, ep.CPU])
    monkeypatch.setattr(ort, "InferenceSession", FallingBackSession)
    monkeypatch.setattr(onnx_module, "_instance_stream", lambda device: FakeStream())
    FallingBackSession.created.clear()

    with pytest.raises(BackendError, match=r"libcublasLt\.so\.13"):
        OnnxBackend(micro_repository / "model.onnx", device="cuda:1", precision="fp32", gpu=GPU)

    (asked,) = FallingBackSession.created
    assert asked[ep.CUDA]["device_id"] == "1"
    assert asked[ep.CUDA]["user_compute_stream"] == "1234"  # the instance's own stream
    assert asked[ep.CPU] == {}


def test_numpy_batches_still_run_without_binding(micro_repository: Path) -> None:
    backend = OnnxBackend(micro_repository / "model.onnx", device="cpu", precision="fp32")
    batch = np.zeros((2, 3, 224, 224), np.float32)
    logits, embedding = backend.infer(batch)
    assert logits.shape[0] == embedding.shape[0] == 2


def test_torch_tensors_go_through_io_binding_with_the_same_answer(
    micro_repository: Path,
) -> None:
    """The zero-copy path a GPU uses (bind the tensor's memory), run on a CPU tensor."""
    import torch

    backend = OnnxBackend(micro_repository / "model.onnx", device="cpu", precision="fp32")
    batch = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)

    bound = backend.infer(torch.from_numpy(batch))
    plain = backend.infer(batch)

    np.testing.assert_array_equal(bound[0], plain[0])
    np.testing.assert_array_equal(bound[1], plain[1])


def test_io_binding_refuses_a_tensor_of_the_wrong_dtype(micro_repository: Path) -> None:
    import torch

    backend = OnnxBackend(micro_repository / "model.fp16.onnx", device="cpu", precision="fp16")
    with pytest.raises(BackendError, match="expects float16"):
        backend.infer(torch.zeros((1, 3, 224, 224)))
