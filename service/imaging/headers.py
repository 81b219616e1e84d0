"""Header checks before any pixel is decoded: format allowlist, sniffing and pixel budget.

Only the allowed Pillow plugins parse the bytes, and only their headers: a decompression bomb
or a disallowed format is refused before it costs memory or a decoder's attack surface.
"""

import contextlib
import io
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import Final

from PIL import Image, ImageFile

from service.imaging.errors import (
    CorruptImage,
    DegenerateImage,
    ImageError,
    ImageTooLarge,
    UnsupportedFormat,
)
from service.imaging.integrity import check_jpeg_complete

# The formats phones, browsers and cameras actually upload, all handled by small, heavily fuzzed
# decoders. Deliberately absent: TIFF (libtiff, dozens of codecs, multi-page, huge tiles), JPEG
# 2000 (OpenJPEG's CVE history), EPS (shells out to Ghostscript) and the long tail of legacy
# plugins. Deployments that need one can pass `allowed_formats` explicitly.
DEFAULT_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP"})

# Pillow has no opener named MPO: the JPEG plugin opens MPO files and re-labels them.
_OPENER_FOR_FORMAT: Final[dict[str, str]] = {"MPO": "JPEG"}

# Longest side over shortest side beyond which an image is refused: a 1:200 strip has no
# content a 224x224 center crop could classify, and such strips are a favourite of bomb files.
MAX_ASPECT_RATIO: Final = 200

# What Pillow raises for bad image data; none of these indicate a bug in this module.
_DECODE_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

# `warnings.catch_warnings` swaps the process-wide filter list and is not thread-safe before
# Python 3.14; serialising the (header-only, sub-millisecond) open keeps concurrent calls from
# restoring each other's filters and leaking an "error" filter into the process.
_OPEN_LOCK: Final = threading.Lock()


@dataclass(frozen=True)
class Header:
    """What the header says: the format Pillow recognised and the stored size."""

    format: str
    width: int
    height: int


def read_header(
    data: bytes, *, max_pixels: int, allowed_formats: frozenset[str] = DEFAULT_FORMATS
) -> Header:
    """Check an upload's header against the allowlist and pixel budget without decoding it."""
    with open_checked(data, normalize_formats(allowed_formats), max_pixels) as img:
        width, height = img.size
        header = Header(str(img.format), width, height)
    if header.format in ("JPEG", "MPO"):
        # This path hands JPEGs to a device decoder that may not notice a missing tail.
        check_jpeg_complete(data)
    return header


def register_codecs() -> None:
    """Import Pillow's format plugins now: its first decode would, holding the GIL."""
    Image.init()


def normalize_formats(allowed_formats: frozenset[str]) -> frozenset[str]:
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


def open_checked(data: bytes, allowed: frozenset[str], max_pixels: int) -> ImageFile.ImageFile:
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
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        img.close()
        raise DegenerateImage(
            f"image is {width}x{height}: sides must be at least 1 pixel and the aspect ratio at "
            f"most 1:{MAX_ASPECT_RATIO}; crop it to the region of interest"
        )
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
