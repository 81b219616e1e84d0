"""Assemble one model batch from queued images, on the instance's device, in its dtype.

Images reach the batcher as uint8 crops `[3, H, W]` (numpy from the CPU decoder, or torch
tensors already on a GPU from the device decoder) or, from protocols that send pixels, as
float32 tensors that are already normalised. Normalisation happens here, once per batch: on a
GPU that means 1 byte per pixel crosses PCIe instead of 4, through a reused pinned buffer, and
the fp16 cast of a half-precision artifact runs on the device instead of the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

Triple = tuple[float, float, float]


def normalize(pixels: np.ndarray, mean: Triple, std: Triple) -> np.ndarray:
    """Map uint8 `[..., 3, H, W]` to float32 `(x / 255 - mean) / std`, in torchvision's op order.

    The same float32 operations as ToTensor + Normalize, so the result is bit-identical to
    timm's eval transform.
    """
    out = pixels.astype(np.float32)
    out /= np.float32(255.0)
    out -= np.asarray(mean, dtype=np.float32)[:, None, None]
    out /= np.asarray(std, dtype=np.float32)[:, None, None]
    return out


class Feeder:
    """Turn a list of queued images into the batch one backend's `infer` takes."""

    def __init__(
        self,
        *,
        device: str,
        input_dtype: str,
        mean: Triple,
        std: Triple,
        input_shape: tuple[int, int, int],
        max_batch_size: int,
        stream: Any = None,
    ) -> None:
        self.device = device
        self.input_dtype = input_dtype
        self._mean, self._std = mean, std
        self.input_shape = input_shape
        self._stream = stream
        self._pinned: torch.Tensor | None = None
        self._device_mean: torch.Tensor | None = None
        self._device_std: torch.Tensor | None = None
        if device != "cpu":
            import torch

            target = torch.device(device)
            self._device_mean = torch.tensor(mean, device=target).view(3, 1, 1)
            self._device_std = torch.tensor(std, device=target).view(3, 1, 1)
            # Page-locked, so the upload is a DMA that need not be staged; reused batch after
            # batch (the instance's thread finishes each batch before preparing the next).
            staging = torch.empty((max_batch_size, *input_shape), dtype=torch.uint8)
            self._pinned = staging.pin_memory()

    def __call__(self, items: Sequence[Any]) -> Any:
        """Return `[B, 3, H, W]` in `input_dtype`: numpy on the CPU, a device tensor on a GPU."""
        if self.device == "cpu":
            return self._host_batch(items)
        return self._device_batch(items)

    def _host_batch(self, items: Sequence[Any]) -> np.ndarray:
        arrays = [_as_numpy(item) for item in items]
        if all(a.dtype == np.uint8 for a in arrays):
            batch = normalize(np.stack(arrays), self._mean, self._std)
        else:
            batch = np.empty((len(arrays), *self.input_shape), np.float32)
            for row, array in enumerate(arrays):
                batch[row] = (
                    normalize(array, self._mean, self._std) if array.dtype == np.uint8 else array
                )
        return batch.astype(self.input_dtype, copy=False)

    def _device_batch(self, items: Sequence[Any]) -> torch.Tensor:
        import torch

        assert self._pinned is not None and self._device_mean is not None  # set for GPUs
        target = torch.device(self.device)
        on_stream = self._stream is not None
        with torch.cuda.stream(self._stream) if on_stream else contextlib.nullcontext():
            batch = torch.empty((len(items), *self.input_shape), dtype=torch.float32, device=target)
            host_rows = [row for row, item in enumerate(items) if isinstance(item, np.ndarray)]
            uint8_rows = [row for row in host_rows if items[row].dtype == np.uint8]
            if uint8_rows:
                staged = self._pinned[: len(uint8_rows)]
                for slot, row in enumerate(uint8_rows):
                    staged[slot].copy_(torch.from_numpy(items[row]))
                batch[uint8_rows] = self._normalized(staged.to(target, non_blocking=True))
            for row, item in enumerate(items):
                if row in uint8_rows:
                    continue
                tensor = torch.as_tensor(item).to(target, non_blocking=True)
                batch[row] = self._normalized(tensor) if tensor.dtype == torch.uint8 else tensor
            return batch.to(getattr(torch, self.input_dtype))

    def _normalized(self, pixels: torch.Tensor) -> torch.Tensor:
        assert self._device_mean is not None and self._device_std is not None
        return pixels.float().div_(255.0).sub_(self._device_mean).div_(self._device_std)


def _as_numpy(item: Any) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    return item.detach().cpu().numpy()  # a torch tensor from the tensor decoder run on the CPU
