"""A stand-in for `nvidia.nvimgcodec` that decodes with Pillow on the CPU.

It has the names the service uses, with the real signatures: `Decoder(device_id=, backends=,
options=)`, `decode(list, params=, cuda_stream=)` returning one image (HWC, with `__dlpack__`)
or None per input, as nvImageCodec does for an image it cannot decode. `refuse` says which
uploads it treats as undecodable, standing in for what the GPU decoders lack.
"""

from __future__ import annotations

import enum
import io
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps


class BackendKind(enum.Enum):
    CPU_ONLY = 1
    GPU_ONLY = 2
    HYBRID_CPU_GPU = 3
    HW_GPU_ONLY = 4


class ColorSpec(enum.Enum):
    SRGB = 1
    GRAY = 2


@dataclass
class Backend:
    backend_kind: BackendKind


@dataclass
class DecodeParams:
    apply_exif_orientation: bool = True
    color_spec: ColorSpec = ColorSpec.SRGB


class FakeNvImageCodec(types.ModuleType):
    """The module: its classes, the decoders made, and what the decoders refuse."""

    Backend, BackendKind, ColorSpec, DecodeParams = Backend, BackendKind, ColorSpec, DecodeParams

    def __init__(self, refuse: Callable[[bytes], bool] = lambda data: False) -> None:
        super().__init__("nvidia.nvimgcodec")
        self.refuse = refuse
        self.decoders: list[FakeDecoder] = []

    def Decoder(  # the real class's name
        self,
        *,
        device_id: int = -1,
        max_num_cpu_threads: int = 0,
        backends: list[Backend] | None = None,
        options: str = ":fancy_upsampling=0",  # the real default
    ) -> FakeDecoder:
        decoder = FakeDecoder(self, device_id, backends or [], options)
        self.decoders.append(decoder)
        return decoder


@dataclass
class FakeDecoder:
    module: FakeNvImageCodec
    device_id: int
    backends: list[Backend]
    options: str
    batches: list[int] = field(default_factory=list)

    def decode(
        self, srcs: Sequence[bytes], *, params: DecodeParams | None = None, cuda_stream: int = 0
    ) -> list[np.ndarray | None]:
        self.batches.append(len(srcs))
        params = params or DecodeParams()
        return [self._decode_one(data, params) for data in srcs]

    def _decode_one(self, data: bytes, params: DecodeParams) -> np.ndarray | None:
        if self.module.refuse(data):
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if params.apply_exif_orientation:
                    image = ImageOps.exif_transpose(image)
                return np.array(image.convert("RGB"))  # writable: DLPack refuses read-only
        except Exception:  # the real decoder logs a warning and returns None
            return None
