"""Decode JPEG batches on a device: nvImageCodec with fancy upsampling, or torchvision's nvJPEG.

Why two: libjpeg-turbo (Pillow, the exact path) interpolates the chroma of 4:2:0 JPEGs
("fancy upsampling"); nvJPEG's default, which torchvision's `decode_jpeg` uses, repeats it
(nearest neighbour), which moves embeddings measurably. nvImageCodec decodes the same batch with
the same nvJPEG kernels (the hardware JPEG decoder where the GPU has one) and exposes the flag.
It is a separate wheel per CUDA major, so torchvision stays as the decoder when it is absent.

Each decoder returns, per upload, an upright uint8 `[3, H, W]` tensor on its device, or None
where it refused the image; the caller sends the refused ones to Pillow.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DeviceDecoderName = Literal["auto", "nvimgcodec", "torchvision"]

# Chroma interpolation like libjpeg-turbo; nvImageCodec's Python default is 0 (nearest).
FANCY_UPSAMPLING = ":fancy_upsampling=1"

# Huffman-coded baseline, extended and progressive frames; lossless (SOF3) and arithmetic
# coding (SOF9..SOF15) go to Pillow, as do 4-component (CMYK, YCCK) images, whose colour
# conversion the device decoders do differently from Pillow.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_OTHER_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_DEVICE_COMPONENTS = frozenset({1, 3})
_NVIMGCODEC_CPU_ONLY = -99999  # NVIMGCODEC_DEVICE_CPU_ONLY in nvimgcodec.h


class JpegBatchDecoder(Protocol):
    """Decode a list of JPEGs together on one device."""

    name: str

    def decode(self, uploads: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Return an upright uint8 [3, H, W] tensor per upload, None where it refused one."""
        ...


class NvImageCodecDecoder:
    """nvImageCodec: hardware JPEG decoder, then the CUDA one, both with fancy upsampling."""

    name = "nvimgcodec"

    def __init__(self, nvimgcodec: Any, device: torch.device) -> None:
        kind = nvimgcodec.BackendKind
        if device.type == "cuda":
            # Listed in priority order; a JPEG the hardware decoder refuses (progressive, a
            # GPU without one) falls back to the CUDA decoder inside the library.
            kinds = [kind.HW_GPU_ONLY, kind.GPU_ONLY]
            device_id = device.index if device.index is not None else _current_cuda_device()
        else:  # tests and CPU-only hosts: libjpeg-turbo inside nvImageCodec
            kinds, device_id = [kind.CPU_ONLY], _NVIMGCODEC_CPU_ONLY
        self._device = device
        self._decoder = nvimgcodec.Decoder(
            device_id=device_id,
            backends=[nvimgcodec.Backend(k) for k in kinds],
            options=FANCY_UPSAMPLING,
        )
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB
        )

    def decode(self, uploads: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Decode the batch in one call; nvImageCodec puts None where an image failed."""
        import torch

        stream = 0
        if self._device.type == "cuda":
            # Decode on the caller's stream, so the resize that follows is ordered after it.
            stream = torch.cuda.current_stream(self._device).cuda_stream
        images = self._decoder.decode(list(uploads), params=self._params, cuda_stream=stream)
        # from_dlpack keeps each Image's buffer alive and waits on its stream; HWC -> CHW.
        return [None if im is None else _rgb_chw(torch.from_dlpack(im)) for im in images]


class TorchvisionDecoder:
    """torchvision's `decode_jpeg`: nvJPEG with its default (nearest) chroma upsampling."""

    name = "torchvision"

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def decode(self, uploads: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Decode the batch in one call; raises RuntimeError when any image fails."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        # bytearray: torch warns on read-only buffers, and the copy costs microseconds.
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in uploads]
        decoded = decode_jpeg(
            encoded, mode=ImageReadMode.RGB, device=self._device, apply_exif_orientation=True
        )
        return list(decoded)


def open_jpeg_decoder(wanted: DeviceDecoderName, device: torch.device) -> JpegBatchDecoder:
    """Return the decoder `wanted` names; auto = nvImageCodec when installed, else torchvision."""
    if wanted == "torchvision":
        return TorchvisionDecoder(device)
    try:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
        return NvImageCodecDecoder(nvimgcodec, device)
    except (ImportError, OSError, RuntimeError) as exc:  # not installed, or its libraries
        if wanted == "nvimgcodec":
            raise RuntimeError(
                f"--device-decoder nvimgcodec, but nvImageCodec cannot start ({exc!r}); install "
                "it with pip install -c constraints-gpu.txt '.[gpu]', or use --device-decoder "
                "torchvision"
            ) from exc
        log.warning("nvImageCodec unavailable (%r): JPEGs decode with torchvision's nvJPEG", exc)
        return TorchvisionDecoder(device)


def device_can_decode(data: bytes) -> bool:
    """Say whether a JPEG's frame is one the device decoders handle like Pillow does."""
    frame = _frame_header(data)
    if frame is None:
        return False
    marker, components = frame
    return marker in _DEVICE_FRAMES and components in _DEVICE_COMPONENTS


def _frame_header(data: bytes) -> tuple[int, int] | None:
    """Return the JPEG's (SOFn marker, component count), or None if no frame header is found."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None  # not a marker where one must be: damaged, let Pillow say so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _DEVICE_FRAMES or marker in _OTHER_FRAMES:
            # SOFn: length(2) precision(1) height(2) width(2) components(1)
            return (marker, data[pos + 9]) if pos + 9 < len(data) else None
        if marker == 0xDA:  # scan data before any frame header
            return None
        pos += 2 + length
    return None


def _rgb_chw(pixels: torch.Tensor) -> torch.Tensor | None:
    """Return an [H, W, C] decode as [3, H, W] RGB (grey repeated); None for other layouts."""
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
        return None
    return pixels.permute(2, 0, 1).expand(3, -1, -1)


def _current_cuda_device() -> int:
    import torch

    return torch.cuda.current_device()
