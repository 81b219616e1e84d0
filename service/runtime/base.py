"""The one call every runtime shares: a contiguous batch in, logits and embedding out."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class BackendError(RuntimeError):
    """A backend that cannot be created with the requested device, precision or artifact."""


class Backend(Protocol):
    """One loaded model instance, owned by exactly one worker thread."""

    name: str  # "onnx" | "torchscript" | "eager"
    device: str  # "cpu" or "cuda:N"
    precision: str  # "fp32" | "fp16" | "bf16"
    provider: str  # what actually runs it: an ORT execution provider, or "torch-<device>"
    input_dtype: str  # "float32" | "float16": what infer() wants the batch in

    def infer(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Return (logits [B, C], embedding [B, D]) as float32 numpy for a [B, 3, H, W] batch.

        The batch is a numpy array, or a torch tensor already on the backend's device.
        """
        ...

    def close(self) -> None:
        """Release device memory and sessions."""
        ...
