"""PyTorch backends: a traced TorchScript file, or the eager module built from weights."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.runtime.base import BackendError

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend:
    """Run a module that maps [B, 3, H, W] to (logits, embedding) on one device."""

    def __init__(self, module: torch.nn.Module, *, name: str, device: str, precision: str):
        if precision == "fp16" and device == "cpu":
            raise BackendError("fp16 autocast is a GPU feature; use bf16 or fp32 on the CPU")
        self.name = name
        self.device = device
        self.precision = precision
        self._torch_device = torch.device(device)
        self._module = module.to(self._torch_device).eval()
        if precision != "fp32":
            precast(self._module, _DTYPES[precision])
        self.input_dtype = "float32"  # autocast casts inside the model
        self.provider = f"torch-{self._torch_device.type}"
        # One stream per instance, so instances on one GPU overlap instead of queueing on the
        # default stream; the pool's feeder prepares this instance's inputs on it too.
        self.stream = torch.cuda.Stream(self._torch_device) if device != "cpu" else None

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self._torch_device.type, dtype=_DTYPES[self.precision])

    def infer(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        """Run a numpy batch, or a torch tensor already on this device."""
        stream = torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()
        with stream, torch.inference_mode(), self._autocast():
            images = torch.as_tensor(batch).to(self._torch_device, non_blocking=True)
            logits, embedding = self._module(images)
            # .cpu() on this stream waits for it, so the result is complete when we return.
            return logits.float().cpu().numpy(), embedding.float().cpu().numpy()

    def close(self) -> None:
        del self._module
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()


# Layers whose weights autocast casts to the reduced precision on every call.
_AUTOCAST_WEIGHTS = ("Linear", "Conv2d")


def precast(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the Linear and Conv2d weights to `dtype` once, in place; return how many layers.

    Autocast rounds them to `dtype` anyway, on every call (its weight cache lives only inside
    one `with` block), so outputs are bit-identical and each call skips reading the fp32 weights
    and writing a copy: about 4 % of Hiera-T's bf16 forward on a 2-core CPU. LayerNorm and the
    rest keep float32, as autocast runs them. Works on traced TorchScript modules too.
    """
    cast = 0
    for layer in module.modules():
        kind = getattr(layer, "original_name", type(layer).__name__)  # TorchScript keeps names
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) or kind in _AUTOCAST_WEIGHTS:
            layer.to(dtype)
            cast += 1
    return cast


def load_torchscript(path: Path, *, device: str, precision: str) -> TorchBackend:
    """Load a traced `model.ts` onto `device`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "jit is deprecated"; still the format
        try:
            # Load on the CPU, then move: map_location would also move the trace's constants
            # (0-d tensors in its shape arithmetic) to the GPU, where mixing them with the
            # CPU sizes fails ("Expected all tensors to be on the same device", seen on an
            # H200); .to() below moves only parameters and buffers.
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise BackendError(f"cannot load TorchScript file {path}: {exc}") from exc
    return TorchBackend(module, name="torchscript", device=device, precision=precision)
