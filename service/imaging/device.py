"""Decode JPEG batches on the model's device and crop them there, Pillow for what it refuses.

`jpeg_decoders` decodes (nvImageCodec with fancy upsampling when installed, else torchvision's
nvJPEG) and `batch_crop` resizes and crops, one call per source size. A JPEG the device decoder
refuses (CMYK, arithmetic coding, damage) goes through the exact Pillow path, so it either
decodes there or fails alone with the same ImageError the CPU path gives.

The same code runs on CPU tensors (libjpeg-turbo inside torchvision or nvImageCodec), which is
how the tests exercise it on machines without a GPU. Geometry comes from `preprocessing`, shared
with the Pillow path, so both crop the same window; only the resampling kernels differ slightly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.imaging import cpu
from service.imaging.batch_crop import crop_batch
from service.imaging.errors import ImageError
from service.imaging.jpeg_decoders import DeviceDecoderName, device_can_decode, open_jpeg_decoder
from service.imaging.preprocessing import Preprocessing

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

    def __init__(
        self,
        pp: Preprocessing,
        device: str,
        *,
        max_pixels: int,
        decoder: DeviceDecoderName = "auto",
    ) -> None:
        import torch
        from torchvision.transforms import InterpolationMode

        self.pp = pp
        self.device = device
        self._torch_device = torch.device(device)
        self._max_pixels = max_pixels
        self._interpolation = InterpolationMode(pp.interpolation)
        self._jpeg = open_jpeg_decoder(decoder, self._torch_device)

    @property
    def decoder_name(self) -> str:
        """Say which library decodes: nvimgcodec or torchvision."""
        return self._jpeg.name

    def decode_batch(self, uploads: Sequence[bytes]) -> DecodedBatch:
        """Decode `uploads` together; an image the device cannot decode goes through Pillow."""
        import torch

        started = time.perf_counter()
        images = self._decode_all(uploads)
        decoded_at = time.perf_counter()
        device_crops = crop_batch(images, self.pp, self._interpolation)
        crops: list[torch.Tensor | ImageError] = [
            self._cpu_crop(data) if crop is None else crop
            for data, crop in zip(uploads, device_crops, strict=True)
        ]
        if self._torch_device.type == "cuda":
            # The crops are consumed on other streams (the instances'): finish them first.
            torch.cuda.current_stream(self._torch_device).synchronize()
        done = time.perf_counter()
        fallbacks = device_crops.count(None)
        return DecodedBatch(crops, decoded_at - started, done - decoded_at, fallbacks)

    def _decode_all(self, uploads: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Decode as one batch; if that raises, one by one, so a bad image fails alone."""
        images: list[torch.Tensor | None] = [None] * len(uploads)
        # Frames the device decoders would decode unlike Pillow never reach them.
        chosen = [i for i, data in enumerate(uploads) if device_can_decode(data)]
        try:
            decoded = self._jpeg.decode([uploads[i] for i in chosen])
        except RuntimeError:  # torchvision rejects the whole list when one image fails
            decoded = [self._decode_one(uploads[i]) for i in chosen]
        for index, image in zip(chosen, decoded, strict=True):
            images[index] = image
        return images

    def _decode_one(self, data: bytes) -> torch.Tensor | None:
        try:
            return self._jpeg.decode([data])[0]
        except RuntimeError:
            return None  # damage, or a JPEG the decoder lacks: Pillow decides

    def _cpu_crop(self, data: bytes) -> torch.Tensor | ImageError:
        """Decode with Pillow: JPEGs the device decoder refused, or a genuinely corrupt file."""
        import torch

        try:
            decoded = cpu.decode_image(data, max_pixels=self._max_pixels)
        except ImageError as exc:
            return exc
        pixels = torch.from_numpy(cpu.crop(decoded.image, self.pp))
        return pixels.to(self._torch_device, non_blocking=True)
