"""Checks that the data can fill the canvas its header declares, where decoders do not check.

Pillow's PNG decoder stops quietly when a well-formed zlib stream ends early, leaving the rest
of the canvas black; nvJPEG may do the same with a JPEG cut before its end-of-image marker.
"""

import struct
import zlib
from typing import Final

from service.imaging.errors import TruncatedImage

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# Samples per pixel for each PNG colour type (grey, RGB, palette, grey+alpha, RGBA).
_PNG_CHANNELS: Final[dict[int, int]] = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (x start, y start, x step, y step).
_ADAM7: Final = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                 (1, 0, 2, 2), (0, 1, 1, 2))  # fmt: skip
_INFLATE_STEP: Final = 1 << 20  # inflate at most this much at a time: bounded memory


def check_png_complete(data: bytes) -> None:
    """Raise TruncatedImage unless the first frame's IDAT data inflates to the full canvas."""
    if not data.startswith(_PNG_SIGNATURE):
        return
    ihdr = _chunk_at(data, len(_PNG_SIGNATURE))
    if ihdr is None or ihdr[0] != b"IHDR" or len(ihdr[1]) < 13:
        return  # the header parser reports a damaged header itself
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[1][:13])
    if colour not in _PNG_CHANNELS:
        return
    needed = _raw_size(width, height, _PNG_CHANNELS[colour] * depth, interlace == 1)
    inflated = _inflated_idat_size(data, needed)
    if inflated < needed:
        raise TruncatedImage(
            f"the PNG declares {width}x{height} pixels but its image data holds only "
            f"{inflated:,} of the {needed:,} bytes they need; the file is truncated"
        )


def check_jpeg_complete(data: bytes) -> None:
    """Raise TruncatedImage if a JPEG has no end-of-image marker after its scan data."""
    start_of_scan = data.find(b"\xff\xda")
    if data.startswith(b"\xff\xd8") and data.rfind(b"\xff\xd9") < start_of_scan:
        raise TruncatedImage(
            "the JPEG ends before its end-of-image marker (FFD9); the file is truncated"
        )


def _raw_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Return the filtered scanline bytes a PNG of this shape decompresses to."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if cols and rows:
            total += rows * (1 + (cols * bits_per_pixel + 7) // 8)
    return total


def _inflated_idat_size(data: bytes, needed: int) -> int:
    """Inflate the consecutive IDAT chunks, stopping as soon as `needed` bytes came out."""
    inflater = zlib.decompressobj()
    produced = 0
    offset = len(_PNG_SIGNATURE)
    seen_idat = False
    while (chunk := _chunk_at(data, offset)) is not None:
        kind, body, offset = chunk
        if kind != b"IDAT":
            if seen_idat:
                break  # the first frame's data ended
            continue
        seen_idat = True
        pending = body
        try:
            while pending and produced < needed:
                produced += len(inflater.decompress(pending, _INFLATE_STEP))
                pending = inflater.unconsumed_tail
        except zlib.error:
            return produced  # damaged data: what inflated is what there is
        if produced >= needed:
            return produced
    return produced


def _chunk_at(data: bytes, offset: int) -> tuple[bytes, bytes, int] | None:
    """Return (type, body, next offset) of the chunk at `offset`, or None past the data."""
    if offset + 8 > len(data):
        return None
    (length,) = struct.unpack(">I", data[offset : offset + 4])
    kind = data[offset + 4 : offset + 8]
    body = data[offset + 8 : offset + 8 + length]
    return kind, body, offset + 12 + length
