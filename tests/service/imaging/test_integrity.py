"""Truncation checks that decoders skip: PNG data short of its canvas, JPEG without its end."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from service.imaging import TruncatedImage, read_header
from service.imaging.integrity import check_jpeg_complete, check_png_complete


def _saved(mode: str, fmt: str, size: tuple[int, int] = (37, 23), **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 50).convert(mode).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_complete_pngs_of_every_mode_pass(mode: str) -> None:
    check_png_complete(_saved(mode, "PNG"))


def test_png_missing_its_last_row_is_truncated() -> None:
    width, height = 5, 4
    full = b"".join(b"\x00" + bytes(width) for _ in range(height))
    good = _build_png(width, height, full)
    short = _build_png(width, height, full[: -(width + 1)])
    check_png_complete(good)
    with pytest.raises(TruncatedImage, match=r"5x4 pixels .* only 18 of the 24 bytes"):
        check_png_complete(short)


def _build_png(width: int, height: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(raw)
    # Split the data over two IDAT chunks, as encoders do: both must be counted.
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat[:5])
        + chunk(b"IDAT", idat[5:]) + chunk(b"IEND", b"")
    )  # fmt: skip


def test_jpeg_without_end_marker_is_refused_on_the_device_path() -> None:
    data = _saved("RGB", "JPEG", (64, 64))
    assert data.endswith(b"\xff\xd9")
    check_jpeg_complete(data)
    assert read_header(data, max_pixels=10**6).format == "JPEG"
    with pytest.raises(TruncatedImage, match="end-of-image marker"):
        read_header(data[:-2], max_pixels=10**6)
