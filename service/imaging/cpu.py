"""Decode and preprocess on the CPU with Pillow: the reference path, exact to timm's transform.

Everything here is synchronous and CPU-bound: the service calls it from a thread pool, and
Pillow releases the GIL while it decodes and resamples.
"""

import contextlib
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from service.imaging.errors import CorruptImage, EmptyImage, ImageTooLarge, UnsupportedFormat
from service.imaging.headers import (
    _DECODE_ERRORS,
    DEFAULT_FORMATS,
    normalize_formats,
    open_checked,
)
from service.imaging.integrity import check_png_complete
from service.imaging.preprocessing import (
    INTERPOLATIONS,
    Preprocessing,
    crop_origin,
    crop_window,
    draft_size,
    resized_size,
)
from service.runtime.feed import normalize

# Formats whose decoder can scale by 1/2, 1/4 or 1/8 while decoding (JPEG DCT scaling).
_DRAFT_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "MPO"})

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS: Final[frozenset[int]] = frozenset({5, 6, 7, 8})

_HIGH_BIT_MODES: Final[frozenset[str]] = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

_ALPHA_MODES: Final[frozenset[str]] = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

_WHITE: Final[tuple[int, int, int, int]] = (255, 255, 255, 255)


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image plus facts about the upload it came from."""

    image: Image.Image
    format: str
    width: int
    height: int
    num_bytes: int


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    allowed_formats: frozenset[str] = DEFAULT_FORMATS,
    draft_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode untrusted bytes into an upright RGB image, refusing anything unsafe.

    `draft_size` is a (width, height) lower bound for the upright result: large JPEGs are then
    decoded at 1/2, 1/4 or 1/8 scale, but never below that bound.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    allowed = normalize_formats(allowed_formats)
    if not data:
        raise EmptyImage("the image is empty (0 bytes); send the image file's bytes")
    with open_checked(data, allowed, max_pixels) as img:
        fmt = str(img.format)
        width, height = img.size
        _load_first_frame(img, draft_size)
        if fmt == "PNG":
            check_png_complete(data)  # Pillow accepts a zlib stream that ends early
        rgb = to_rgb(_apply_exif_orientation(img))
    return DecodedImage(rgb, fmt, width, height, len(data))


def crop(image: Image.Image, pp: Preprocessing, *, out: np.ndarray | None = None) -> np.ndarray:
    """Resize and center-crop like timm's eval transform; returns uint8 (3, height, width).

    What the batcher queues: the runtime normalises a whole batch at once, on its device.
    With `out` (a uint8 (3, height, width) array, e.g. a shared-memory slot), the crop is
    written there by the one copy that turns Pillow's rows into planes, and `out` returned.
    """
    planes = _resize_and_crop(to_rgb(image), pp).transpose(2, 0, 1)
    if out is None:
        return np.ascontiguousarray(planes)
    np.copyto(out, planes)
    return out


def preprocess(image: Image.Image, pp: Preprocessing) -> np.ndarray:
    """Resize, center-crop and normalize an image exactly like timm's eval transform.

    Returns a float32, C-contiguous array of shape (3, height, width). Non-RGB images are
    converted with `to_rgb` first. Only for extreme aspect ratios (a resized image over 4M
    pixels) does it resample just the crop window instead, which can differ by an 8-bit level.
    """
    return normalize(crop(image, pp), pp.mean, pp.std)


def decode_and_preprocess(
    data: bytes,
    pp: Preprocessing,
    *,
    max_pixels: int,
    allowed_formats: frozenset[str] = DEFAULT_FORMATS,
    draft: bool = False,
) -> tuple[np.ndarray, DecodedImage]:
    """Decode an upload (exactly, or JPEG-drafted to the resize target) and preprocess it."""
    decoded = decode_image(
        data,
        max_pixels=max_pixels,
        allowed_formats=allowed_formats,
        draft_size=draft_size(pp) if draft else None,
    )
    return preprocess(decoded.image, pp), decoded


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB deterministically, compositing alpha over white.

    White, not "drop the alpha channel": fully transparent pixels keep whatever colour the
    encoder left behind (often black, sometimes stale data), and showing them would feed the
    model content nobody sees. White is also what viewers and browsers show behind such images.
    """
    if img.mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(img)
    if img.mode == "F":
        return _float_to_rgb(img)
    if img.mode in _ALPHA_MODES or img.has_transparency_data:
        return _composite_on_white(img)
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise UnsupportedFormat(
            f"pixel mode {img.mode} cannot be converted to RGB; re-save the image as 8-bit RGB "
            "(for example PNG or JPEG)"
        ) from exc


def _load_first_frame(img: ImageFile.ImageFile, draft_size: tuple[int, int] | None) -> None:
    """Decode the first frame's pixels, at draft scale where that is allowed."""
    try:
        img.seek(0)  # animated GIF / WebP / APNG / MPO: the first frame is the image
        if draft_size is not None:
            _maybe_draft(img, draft_size)
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused as a possible decompression bomb ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImage(
            f"the {img.format} data is truncated or damaged ({exc}); re-export or re-upload it"
        ) from exc


def _maybe_draft(img: ImageFile.ImageFile, draft_size: tuple[int, int]) -> None:
    """Let the JPEG decoder downscale by a power of two while keeping >= draft_size."""
    if img.format not in _DRAFT_FORMATS:
        return
    want_w, want_h = draft_size
    if _exif_orientation(img) in _SWAPPING_ORIENTATIONS:
        # The decoder works on stored axes; orientation swaps them only afterwards.
        want_w, want_h = want_h, want_w
    width, height = img.size
    if width < 2 * want_w or height < 2 * want_h:
        return  # the smallest DCT scale is 1/2: nothing to gain below 2x
    # Pillow picks scale s <= min(width // want_w, height // want_h) and rounds sizes up, so the
    # drafted image is never smaller than the requested size on either side.
    img.draft("RGB", (want_w, want_h))


def _exif_orientation(img: Image.Image) -> int:
    """Return the EXIF orientation tag, or 1 (upright) when absent or unreadable."""
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # EXIF is untrusted metadata: any parse failure means "no orientation"
        return 1


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip the image upright per EXIF, keeping it as stored if the EXIF is broken."""
    # A broken EXIF block is metadata damage, not pixel damage: the user still gets a result.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    return img


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit greyscale to 8 bits with round(x / 257), clipping to [0, 65535].

    Division by 257 with rounding inverts the 8-to-16-bit expansion x * 257 exactly (it is the
    PNG spec's recommended reduction); Pillow's own convert("L") clips, turning most of a 16-bit
    image white. Mode "I" is treated as 16-bit data because that is what decoders store in it.
    """
    wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    grey = ((wide + 128) // 257).astype(np.uint8)  # integer round-half-up of x / 257
    return Image.fromarray(grey).convert("RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    """Round and clip mode-F samples to 0..255, Pillow's convention for float images."""
    samples = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
    grey = np.clip(np.rint(samples), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Alpha-composite an image with transparency over an opaque white background."""
    # Pillow has no direct La -> RGBA conversion; un-premultiply to LA first.
    rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _resize_and_crop(rgb: Image.Image, pp: Preprocessing) -> np.ndarray:
    """Resize like timm, then center-crop to input_size; returns uint8 (H, W, 3)."""
    crop_h, crop_w = pp.input_size
    width, height = rgb.size
    new_w, new_h = resized_size(width, height, pp)
    resample = INTERPOLATIONS[pp.interpolation]
    box = crop_window(width, height, pp)
    if box is not None:
        # Only for extreme aspect ratios timm would choke on; not bit-identical to timm.
        return np.asarray(rgb.resize((crop_w, crop_h), resample, box=box))
    if (new_w, new_h) != (width, height):  # torchvision skips the resize in this case too
        rgb = rgb.resize((new_w, new_h), resample)
    return _center_crop(np.asarray(rgb), (crop_h, crop_w))


def _center_crop(pixels: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """Center-crop an (H, W, C) array, zero-padding first when it is smaller, like torchvision."""
    crop_h, crop_w = crop_size
    height, width = pixels.shape[:2]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        # torchvision puts the odd pixel of padding at the bottom / right.
        padding = ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        pixels = np.pad(pixels, padding)
        height, width = pixels.shape[:2]
    top, left = crop_origin(height, crop_h), crop_origin(width, crop_w)
    return pixels[top : top + crop_h, left : left + crop_w]
