"""The model's eval preprocessing, as configuration and geometry shared by every decoder.

Both the CPU (Pillow) and the device (torch) paths resize and crop with these numbers, so they
agree on which pixels the model sees.
"""

import math
from dataclasses import dataclass
from typing import Final

from PIL import Image

INTERPOLATIONS: Final[dict[str, Image.Resampling]] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

CROP_MODES: Final[frozenset[str]] = frozenset({"center"})
# Above this many resized pixels only the crop window is resampled, so an extreme aspect ratio
# (a 1x100000 strip) cannot make a decoder allocate gigabytes, on the host or on a GPU.
MAX_RESIZED_PIXELS: Final[int] = 1 << 22


@dataclass(frozen=True)
class Preprocessing:
    """Eval-time preprocessing of a timm model (its `pretrained_cfg` / data config)."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        """Reject configurations that timm's eval transform would not produce."""
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (height, width) > 0, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {self.mean} and {self.std}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive in every channel, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not supported; "
                f"use one of {', '.join(sorted(INTERPOLATIONS))}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(
                f"crop_mode {self.crop_mode!r} is not supported; use one of "
                f"{', '.join(sorted(CROP_MODES))} (timm's default eval mode)"
            )


def resize_size(pp: Preprocessing) -> int:
    """Return the shorter-side resize target, computed exactly as timm's eval transform does."""
    return math.floor(min(pp.input_size) / pp.crop_pct)


def draft_size(pp: Preprocessing) -> tuple[int, int]:
    """Return the (width, height) a JPEG may be drafted down to without losing model detail."""
    # Keeping both upright sides >= timm's resize target means the resize still only shrinks,
    # so drafting loses no detail the model would have seen.
    scale_h, scale_w = scale_size(pp)
    return scale_w, scale_h


def scale_size(pp: Preprocessing) -> tuple[int, int]:
    """Return timm's (height, width) resize target: floor(input side / crop_pct)."""
    height, width = pp.input_size
    return math.floor(height / pp.crop_pct), math.floor(width / pp.crop_pct)


def resized_size(width: int, height: int, pp: Preprocessing) -> tuple[int, int]:
    """Return the (width, height) timm's eval resize produces for an image of this size."""
    scale_h, scale_w = scale_size(pp)
    if scale_h == scale_w:
        # torchvision Resize(int): shorter side -> scale, longer side truncated, not rounded.
        short, long = min(width, height), max(width, height)
        new_short, new_long = scale_h, int(scale_h * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    # Non-square inputs: timm's ResizeKeepRatio scales by the smaller ratio and rounds both sides.
    ratio = min(height / scale_h, width / scale_w)
    return round(width / ratio), round(height / ratio)


def crop_origin(size: int, crop: int) -> int:
    """Return torchvision CenterCrop's offset: round((size - crop) / 2), half to even."""
    return round((size - crop) / 2.0)


def crop_window(
    width: int, height: int, pp: Preprocessing
) -> tuple[float, float, float, float] | None:
    """Return the source box (left, top, right, bottom) that lands in the crop, when only it
    should be resampled (a resized image over MAX_RESIZED_PIXELS); None for resize-then-crop.

    Same geometry as resizing the whole image and center-cropping, with memory bounded by the
    crop; the resampling can differ from the full resize in the last bit.
    """
    crop_h, crop_w = pp.input_size
    new_w, new_h = resized_size(width, height, pp)
    if new_w * new_h <= MAX_RESIZED_PIXELS or new_w < crop_w or new_h < crop_h:
        return None
    top, left = crop_origin(new_h, crop_h), crop_origin(new_w, crop_w)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
