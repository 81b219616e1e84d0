"""Bounded fuzz of the image entry point: any bytes decode or raise an ImageError, nothing else."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.imaging import ImageError, decode_and_preprocess
from tests.service.helpers import MICRO_PP


def _seed_images() -> list[bytes]:
    seeds = []
    for fmt, mode in (
        ("JPEG", "RGB"),
        ("PNG", "RGBA"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("WEBP", "RGB"),
    ):
        buffer = io.BytesIO()
        Image.effect_noise((40, 30), 40).convert(mode).save(buffer, format=fmt)
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = _seed_images()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image of an allowed format, then cut, overwritten and/or extended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    data += draw(st.binary(max_size=64))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_images(), st.binary(max_size=512)))
def test_any_bytes_decode_or_raise_an_image_error(data: bytes) -> None:
    try:
        pixels, decoded = decode_and_preprocess(data, MICRO_PP, max_pixels=1_000_000)
    except ImageError as exc:
        assert str(exc)  # every refusal says what is wrong
        return
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all()
    assert decoded.width * decoded.height <= 1_000_000
