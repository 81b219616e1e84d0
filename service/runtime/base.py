"""The one call every runtime shares: a contiguous float32 batch in, logits and embedding out."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendError(RuntimeError):
    """A backend that cannot be created with the requested device, precision or artifact."""


class Backend(Protocol):
    """One loaded model instance, owned by exactly one worker thread."""

    name: str  # "onnx" | "torchscript" | "eager"
    device: str  # "cpu" or "cuda:N"
    precision: str  # "fp32" | "fp16" | "bf16"

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (logits [B, C], embedding [B, D]) as float32 numpy for a [B, 3, H, W] batch."""
        ...

    def close(self) -> None:
        """Release device memory and sessions."""
        ...
