"""A hostile-input corpus, generated here: every case gets its exact 4xx; the server stays ready."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

from service.app import create_app
from tests.service.helpers import make_image, repository_settings, running, sample

JPEG = "image/jpeg"
PNG = "image/png"


def _png(width: int, height: int, raw: bytes, *, colour: int = 0) -> bytes:
    """A PNG with this IHDR and `raw` (filtered scanlines) as its one IDAT, written by hand."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


# (name, body, content type, status, error code)
CORPUS: list[tuple[str, bytes, str, int, str]] = [
    ("empty body", b"", JPEG, 400, "empty_image"),
    ("text sent as a JPEG", b"hello, I am not an image" * 10, JPEG, 415, "unsupported_format"),
    ("HTML sent as a PNG", b"<html><body>hi</body></html>", PNG, 415, "unsupported_format"),
    ("PNG magic then garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, PNG, 400, "corrupt_image"),
    ("JPEG magic then garbage", b"\xff\xd8\xff\xe0" + b"\x13" * 64, JPEG, 400, "corrupt_image"),
    (
        "JPEG cut in half",
        _encoded("JPEG")[: len(_encoded("JPEG")) // 2],
        JPEG,
        400,
        "corrupt_image",
    ),
    ("PNG cut in half", _encoded("PNG")[: len(_encoded("PNG")) // 2], PNG, 400, "corrupt_image"),
    (
        "GIF cut in half",
        _encoded("GIF")[: len(_encoded("GIF")) // 2],
        "image/gif",
        400,
        "corrupt_image",
    ),
    (
        "BMP cut in half",
        _encoded("BMP")[: len(_encoded("BMP")) // 2],
        "image/bmp",
        400,
        "corrupt_image",
    ),
    # A valid zlib stream that simply ends: Pillow itself accepts it with a black remainder.
    (
        "PNG whose data ends at a row",
        _png(1000, 1000, b"\x00" * 1001 * 10),
        PNG,
        400,
        "truncated_image",
    ),
    (
        "PNG 1 x 2,000,000 with 1 KB of data",
        _png(1, 2_000_000, b"\x00" * 1000),
        PNG,
        422,
        "degenerate_image",
    ),
    ("PNG 300 x 1", _png(300, 1, b"\x00" * 301), PNG, 422, "degenerate_image"),
    (
        "PNG declaring 100k x 100k (bomb)",
        _png(100_000, 100_000, b"\x00" * 100),
        PNG,
        413,
        "image_too_large",
    ),
    ("TIFF (not allowed)", _encoded("TIFF"), "image/tiff", 415, "unsupported_format"),
    (
        "a JPEG with a PDF content type",
        make_image(0),
        "application/pdf",
        415,
        "unsupported_media_type",
    ),
]


async def test_hostile_corpus_gets_exact_4xx_and_server_stays_ready(
    micro_repository: Path,
) -> None:
    app = create_app(repository_settings(micro_repository, max_image_pixels=4_000_000))
    seen = []
    async with running(app) as client:
        for name, body, content_type, _, _ in CORPUS:
            answer = await client.post(
                "/v1/classify", content=body, headers={"Content-Type": content_type}
            )
            error = answer.json().get("error", {})
            seen.append((name, answer.status_code, error.get("code")))
            assert error.get("message"), name  # every refusal says what is wrong
        multipart = [
            # A text field where the file should be.
            ("text instead of a file", {"files": {"image": (None, b"not a file")}}, 400,
             "missing_image"),
            ("no image field", {"files": {"other": ("a.jpg", make_image(1), JPEG)}}, 400,
             "missing_image"),
            ("two files on the single route", {"files": [
                ("image", ("a.jpg", make_image(1), JPEG)), ("image", ("b.jpg", make_image(2), JPEG))
            ]}, 400, "too_many_images"),
        ]  # fmt: skip
        for name, kwargs, _, _ in multipart:
            answer = await client.post("/v1/classify", **kwargs)  # type: ignore[arg-type]
            seen.append((name, answer.status_code, answer.json()["error"]["code"]))
        broken_boundary = await client.post(
            "/v1/classify",
            content=b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
        seen.append(("unterminated multipart", broken_boundary.status_code,
                     broken_boundary.json()["error"]["code"]))  # fmt: skip
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        fine = await client.post(
            "/v1/classify", content=make_image(3), headers={"Content-Type": JPEG}
        )
    expected = (
        [(name, status, code) for name, _, _, status, code in CORPUS]
        + [(name, status, code) for name, _, status, code in multipart]
        + [("unterminated multipart", 400, "missing_image")]
    )
    assert seen == expected
    assert (ready.status_code, live.status_code, fine.status_code) == (200, 200, 200)
    assert sample(app, "hiera_batch_failures_total") == 0
