"""ONNX Runtime backend: TensorRT, CUDA or CPU execution providers, chosen per device."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime.base import BackendError

# Fastest first; ORT falls back down this list for nodes a provider cannot run.
_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = frozenset(_PREFERRED[:2])


def choose_providers(
    device: str, available: list[str], requested: list[str] | None = None
) -> list[str]:
    """Return the providers to use on `device`, in priority order, validated against ORT."""
    wanted = list(requested) if requested else list(_PREFERRED)
    if device == "cpu":
        wanted = [p for p in wanted if p not in _GPU_PROVIDERS]
    missing = [p for p in wanted if p not in available] if requested else []
    if missing:
        raise BackendError(
            f"ONNX Runtime providers {missing} are not available in this build (available: "
            f"{available}); install onnxruntime-gpu for CUDA/TensorRT"
        )
    chosen = [p for p in wanted if p in available]
    if device.startswith("cuda") and not _GPU_PROVIDERS & set(chosen):
        raise BackendError(
            f"device {device} needs the CUDA or TensorRT provider, but ONNX Runtime offers "
            f"{available}; install the hiera-serve[gpu] extra (onnxruntime-gpu)"
        )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # the universal fallback for unsupported nodes
    return chosen


class OnnxBackend:
    """One ONNX Runtime session pinned to one device."""

    name = "onnx"

    def __init__(
        self,
        path: Path,
        *,
        device: str,
        precision: str,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        self.device = device
        self.precision = precision
        chosen = choose_providers(device, ort.get_available_providers(), providers)
        device_id = int(device.split(":")[1]) if device.startswith("cuda") else 0
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        provider_options = [
            {"device_id": str(device_id)} if p in _GPU_PROVIDERS else {} for p in chosen
        ]
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=chosen, provider_options=provider_options
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BackendError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self.providers = self._session.get_providers()
        meta = self._session.get_inputs()[0]
        self._input_name = meta.name
        self._input_dtype = np.float16 if meta.type == "tensor(float16)" else np.float32

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self._session.run(
            None, {self._input_name: batch.astype(self._input_dtype, copy=False)}
        )
        return np.asarray(logits, np.float32), np.asarray(embedding, np.float32)

    def close(self) -> None:
        del self._session
