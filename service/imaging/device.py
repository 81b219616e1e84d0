"""Decode JPEGs in batches with torch (nvJPEG on a GPU) and resize/crop them on that device.

Why torchvision's `decode_jpeg`: it takes a list of encoded images and decodes them as one
nvJPEG batch, it is thread-safe on CUDA, it applies EXIF orientation, and it ships inside the
torchvision wheel that the service already needs, built against the same CUDA as torch, so it
adds no dependency that could disagree with it (nvImageCodec and DALI come as separate
per-CUDA-major wheels). torchvision 0.29 marks it deprecated in favour of TorchCodec, which
keeps the same call; `_decode_jpegs` is the one place to switch.

The same code runs on CPU tensors (libjpeg-turbo inside torchvision), which is how the tests
exercise it on machines without a GPU. Geometry comes from `preprocessing`, shared with the
Pillow path, so both crop the same window; only the resampling kernels differ slightly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.imaging import cpu
from service.imaging.errors import ImageError
from service.imaging.preprocessing import Preprocessing, crop_window, resized_size

if TYPE_CHECKING:
    import torch

# JPEG only: the formats nvJPEG decodes. MPO (several JPEGs in one file) and everything else
# take the CPU path.
DEVICE_FORMATS = frozenset({"JPEG"})


@dataclass(frozen=True)
class DecodedBatch:
    """Per image, a uint8 `[3, H, W]` crop on the device or the error that refused it."""

    crops: list[torch.Tensor | ImageError]
    decode_seconds: float
    preprocess_seconds: float
    cpu_fallbacks: int


class TensorDecoder:
    """Decode a batch of JPEG uploads and crop them to the model's input on one device."""

    def __init__(self, pp: Preprocessing, device: str, *, max_pixels: int) -> None:
        import torch
        from torchvision.transforms import InterpolationMode

        self.pp = pp
        self.device = device
        self._torch_device = torch.device(device)
        self._max_pixels = max_pixels
        self._interpolation = InterpolationMode(pp.interpolation)

    def decode_batch(self, uploads: Sequence[bytes]) -> DecodedBatch:
        """Decode `uploads` together; an image the device cannot decode goes through Pillow."""
        import torch

        started = time.perf_counter()
        images, fallbacks = self._decode_all(uploads)
        decoded_at = time.perf_counter()
        crops: list[torch.Tensor | ImageError] = []
        for data, image in zip(uploads, images, strict=True):
            if image is None:
                crops.append(self._cpu_crop(data))
            else:
                crops.append(self._crop(image))
        if self._torch_device.type == "cuda":
            # The crops are consumed on other streams (the instances'): finish them first.
            torch.cuda.current_stream(self._torch_device).synchronize()
        done = time.perf_counter()
        return DecodedBatch(crops, decoded_at - started, done - decoded_at, fallbacks)

    def _decode_all(self, uploads: Sequence[bytes]) -> tuple[list[torch.Tensor | None], int]:
        """Decode as one batch; if that fails, one by one, so a bad image fails alone."""
        try:
            return list(_decode_jpegs(uploads, self._torch_device)), 0
        except RuntimeError:
            pass  # nvJPEG rejects the whole list when one image fails
        images: list[torch.Tensor | None] = []
        for data in uploads:
            try:
                images.append(_decode_jpegs([data], self._torch_device)[0])
            except RuntimeError:
                images.append(None)  # CMYK, arithmetic coding, damage: Pillow decides
        return images, images.count(None)

    def _cpu_crop(self, data: bytes) -> torch.Tensor | ImageError:
        """Decode with Pillow: accepted formats nvJPEG lacks, or a genuinely corrupt file."""
        import torch

        try:
            decoded = cpu.decode_image(data, max_pixels=self._max_pixels)
        except ImageError as exc:
            return exc
        pixels = torch.from_numpy(cpu.crop(decoded.image, self.pp))
        return pixels.to(self._torch_device, non_blocking=True)

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        """Resize the short side and center-crop, with the geometry of timm's eval transform."""
        from torchvision.transforms.v2 import functional as tvf

        crop_h, crop_w = self.pp.input_size
        height, width = image.shape[-2:]
        new_w, new_h = resized_size(width, height, self.pp)
        box = crop_window(width, height, self.pp)
        if box is not None:  # resample only the source window that lands in the crop
            left, top, right, bottom = box
            rows, cols = max(1, round(bottom - top)), max(1, round(right - left))
            window = image[:, round(top) : round(top) + rows, round(left) : round(left) + cols]
            return tvf.resize(window, [crop_h, crop_w], self._interpolation, antialias=True)
        if (new_w, new_h) != (width, height):
            image = tvf.resize(image, [new_h, new_w], self._interpolation, antialias=True)
        return tvf.center_crop(image, [crop_h, crop_w]).contiguous()


def _decode_jpegs(uploads: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    # bytearray: torch warns on read-only buffers, and the copy costs microseconds.
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in uploads]
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
