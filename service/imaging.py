"""Safe image decoding and the model's eval preprocessing (numpy + Pillow only, no torch).

Everything here is synchronous and CPU-bound: the service calls it from a thread pool, and
Pillow releases the GIL while it decodes and resamples.
"""

import contextlib
import io
import math
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import ClassVar, Final

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

__all__ = [
    "CROP_MODES",
    "DEFAULT_FORMATS",
    "INTERPOLATIONS",
    "CorruptImage",
    "DecodedImage",
    "EmptyImage",
    "ImageError",
    "ImageTooLarge",
    "Preprocessing",
    "UnsupportedFormat",
    "decode_and_preprocess",
    "decode_image",
    "draft_size",
    "preprocess",
    "resize_size",
    "to_rgb",
]

# The formats phones, browsers and cameras actually upload, all handled by small, heavily fuzzed
# decoders. Deliberately absent: TIFF (libtiff, dozens of codecs, multi-page, huge tiles), JPEG
# 2000 (OpenJPEG's CVE history), EPS (shells out to Ghostscript) and the long tail of legacy
# plugins. Deployments that need one can pass `allowed_formats` explicitly.
DEFAULT_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP"})

INTERPOLATIONS: Final[dict[str, Image.Resampling]] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROP_MODES: Final[frozenset[str]] = frozenset({"center"})

# Pillow has no opener named MPO: the JPEG plugin opens MPO files and re-labels them.
_OPENER_FOR_FORMAT: Final[dict[str, str]] = {"MPO": "JPEG"}
# Formats whose decoder can scale by 1/2, 1/4 or 1/8 while decoding (JPEG DCT scaling).
_DRAFT_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "MPO"})
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS: Final[frozenset[int]] = frozenset({5, 6, 7, 8})
_HIGH_BIT_MODES: Final[frozenset[str]] = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES: Final[frozenset[str]] = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_WHITE: Final[tuple[int, int, int, int]] = (255, 255, 255, 255)
# What Pillow raises for bad image data; none of these indicate a bug in this module.
_DECODE_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# Above this many pixels the full shorter-side resize (what timm does) is skipped in favour of
# resampling only the crop window, so a 1x100000 strip cannot make us allocate gigabytes.
_MAX_RESIZED_PIXELS: Final[int] = 1 << 22
# `warnings.catch_warnings` swaps the process-wide filter list and is not thread-safe before
# Python 3.14; serialising the (header-only, sub-millisecond) open keeps concurrent calls from
# restoring each other's filters and leaking an "error" filter into the process.
_OPEN_LOCK: Final = threading.Lock()


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


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image plus facts about the upload it came from."""

    image: Image.Image
    format: str
    width: int
    height: int
    num_bytes: int


class ImageError(Exception):
    """An upload the service refuses to decode; the message says what is wrong and how to fix it."""

    code: ClassVar[str] = "invalid_image"


class EmptyImage(ImageError):
    """The request carried no image bytes."""

    code: ClassVar[str] = "empty_image"


class UnsupportedFormat(ImageError):
    """The bytes are not an image, or an image in a format outside the allowlist."""

    code: ClassVar[str] = "unsupported_format"


class ImageTooLarge(ImageError):
    """The image has more pixels than the service is willing to decode."""

    code: ClassVar[str] = "image_too_large"


class CorruptImage(ImageError):
    """The image is in an accepted format but its data is truncated or undecodable."""

    code: ClassVar[str] = "corrupt_image"


def resize_size(pp: Preprocessing) -> int:
    """Return the shorter-side resize target, computed exactly as timm's eval transform does."""
    return math.floor(min(pp.input_size) / pp.crop_pct)


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
    allowed = _normalize_formats(allowed_formats)
    if not data:
        raise EmptyImage("the image is empty (0 bytes); send the image file's bytes")
    with _open(data, allowed, max_pixels) as img:
        fmt = str(img.format)
        width, height = img.size
        _load_first_frame(img, draft_size)
        rgb = to_rgb(_apply_exif_orientation(img))
    return DecodedImage(rgb, fmt, width, height, len(data))


def preprocess(image: Image.Image, pp: Preprocessing) -> np.ndarray:
    """Resize, center-crop and normalize an image exactly like timm's eval transform.

    Returns a float32, C-contiguous array of shape (3, height, width). Non-RGB images are
    converted with `to_rgb` first. Only for extreme aspect ratios (a resized image over 4M
    pixels) does it resample just the crop window instead, which can differ by an 8-bit level.
    """
    pixels = _resize_and_crop(to_rgb(image), pp)
    return _normalize(pixels, pp.mean, pp.std)


def decode_and_preprocess(
    data: bytes,
    pp: Preprocessing,
    *,
    max_pixels: int,
    allowed_formats: frozenset[str] = DEFAULT_FORMATS,
) -> tuple[np.ndarray, DecodedImage]:
    """Decode an upload (JPEG-drafting down to the resize target) and preprocess it for `pp`."""
    decoded = decode_image(
        data,
        max_pixels=max_pixels,
        allowed_formats=allowed_formats,
        draft_size=draft_size(pp),
    )
    return preprocess(decoded.image, pp), decoded


def draft_size(pp: Preprocessing) -> tuple[int, int]:
    """Return the (width, height) a JPEG may be drafted down to without losing model detail."""
    # Keeping both upright sides >= timm's resize target means the resize still only shrinks,
    # so drafting loses no detail the model would have seen.
    scale_h, scale_w = _scale_size(pp)
    return scale_w, scale_h


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


def _normalize_formats(allowed_formats: frozenset[str]) -> frozenset[str]:
    """Upper-case the allowlist and reject names Pillow does not know."""
    allowed = frozenset(f.upper() for f in allowed_formats)
    if not allowed:
        raise ValueError("allowed_formats is empty; allow at least one format, e.g. JPEG")
    Image.init()  # registers every plugin once, so the check below sees all format names
    unknown = {f for f in allowed if _OPENER_FOR_FORMAT.get(f, f) not in Image.OPEN}
    if unknown:
        raise ValueError(
            f"unknown image formats {sorted(unknown)}; use Pillow format names such as "
            f"{', '.join(sorted(DEFAULT_FORMATS))}"
        )
    return allowed


def _open(data: bytes, allowed: frozenset[str], max_pixels: int) -> ImageFile.ImageFile:
    """Parse only the header, with only the allowed plugins, and enforce the pixel limit."""
    openers = sorted({_OPENER_FOR_FORMAT.get(f, f) for f in allowed})
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=openers)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"image refused as a possible decompression bomb ({exc}); "
            f"send an image of at most {max_pixels:,} pixels"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise _unidentified(data, allowed) from exc
    except _DECODE_ERRORS as exc:
        detected = _sniff_format(data[:16]) or "image"
        raise CorruptImage(
            f"the {detected} header could not be parsed ({exc}); re-export or re-upload it"
        ) from exc
    if img.format not in allowed:
        img.close()
        raise _not_allowed(str(img.format), allowed)
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; downscale it before uploading"
        )
    return img


def _unidentified(data: bytes, allowed: frozenset[str]) -> ImageError:
    """Explain why no allowed plugin accepted the data, naming the format where we can tell."""
    detected = _sniff_format(data[:16])
    if detected is None:
        return UnsupportedFormat(
            "the data is not a recognized image; send one of: " + ", ".join(sorted(allowed))
        )
    if detected in allowed:
        return CorruptImage(
            f"the data starts like a {detected} image but its header is damaged; re-export it"
        )
    return _not_allowed(detected, allowed)


def _sniff_format(prefix: bytes) -> str | None:
    """Name the Pillow format whose magic bytes match, without running any parser."""
    for name, (_, accept) in Image.OPEN.items():
        # Plugins without an accept() would claim any data: their name would mislead the user.
        if accept is None:
            continue
        with contextlib.suppress(Exception):  # a sniffing failure just means "not this one"
            if accept(prefix):
                return name
    return None


def _not_allowed(detected: str, allowed: frozenset[str]) -> UnsupportedFormat:
    """Build the error for a recognized format that the allowlist excludes."""
    return UnsupportedFormat(
        f"image format {detected} is not accepted; convert it to one of: "
        + ", ".join(sorted(allowed))
    )


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


def _scale_size(pp: Preprocessing) -> tuple[int, int]:
    """Return timm's (height, width) resize target: floor(input side / crop_pct)."""
    height, width = pp.input_size
    return math.floor(height / pp.crop_pct), math.floor(width / pp.crop_pct)


def _resized_size(width: int, height: int, pp: Preprocessing) -> tuple[int, int]:
    """Return the (width, height) timm's eval resize produces for an image of this size."""
    scale_h, scale_w = _scale_size(pp)
    if scale_h == scale_w:
        # torchvision Resize(int): shorter side -> scale, longer side truncated, not rounded.
        short, long = min(width, height), max(width, height)
        new_short, new_long = scale_h, int(scale_h * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    # Non-square inputs: timm's ResizeKeepRatio scales by the smaller ratio and rounds both sides.
    ratio = min(height / scale_h, width / scale_w)
    return round(width / ratio), round(height / ratio)


def _resize_and_crop(rgb: Image.Image, pp: Preprocessing) -> np.ndarray:
    """Resize like timm, then center-crop to input_size; returns uint8 (H, W, 3)."""
    crop_h, crop_w = pp.input_size
    width, height = rgb.size
    new_w, new_h = _resized_size(width, height, pp)
    resample = INTERPOLATIONS[pp.interpolation]
    if new_w * new_h > _MAX_RESIZED_PIXELS and new_w >= crop_w and new_h >= crop_h:
        # Resample only the crop window: same geometry as resize-then-crop, but memory bounded
        # by the crop. Pillow's float rounding can differ in the last bit, so this is not bit-
        # identical to timm; it only runs for extreme aspect ratios timm would choke on.
        top, left = _crop_origin(new_h, crop_h), _crop_origin(new_w, crop_w)
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return np.asarray(rgb.resize((crop_w, crop_h), resample, box=box))
    if (new_w, new_h) != (width, height):  # torchvision skips the resize in this case too
        rgb = rgb.resize((new_w, new_h), resample)
    return _center_crop(np.asarray(rgb), (crop_h, crop_w))


def _crop_origin(size: int, crop: int) -> int:
    """Return torchvision CenterCrop's offset: round((size - crop) / 2), half to even."""
    return round((size - crop) / 2.0)


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
    top, left = _crop_origin(height, crop_h), _crop_origin(width, crop_w)
    return pixels[top : top + crop_h, left : left + crop_w]


def _normalize(
    pixels: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """Convert uint8 (H, W, 3) to normalized float32 (3, H, W), in torchvision's op order."""
    # Same float32 ops as ToTensor + Normalize (x / 255, - mean, / std): bit-identical output.
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)
    chw /= np.float32(255.0)
    chw -= np.asarray(mean, dtype=np.float32)[:, None, None]
    chw /= np.asarray(std, dtype=np.float32)[:, None, None]
    return chw
