"""Tests for service.imaging: safe decoding and timm-identical eval preprocessing."""

import io
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torchvision.transforms.functional as tvf
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from service import imaging
from service.imaging import (
    DEFAULT_FORMATS,
    CorruptImage,
    DecodedImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    Preprocessing,
    UnsupportedFormat,
    decode_and_preprocess,
    decode_image,
    preprocess,
    resize_size,
    to_rgb,
)

MAX_PIXELS = 50_000_000
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def make_pp(
    interpolation: str = "bicubic",
    crop_pct: float = 0.9,
    input_size: tuple[int, int] = (224, 224),
) -> Preprocessing:
    """Build ImageNet-normalized preprocessing, the Hiera default."""
    return Preprocessing(
        input_size=input_size,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        interpolation=interpolation,
        crop_pct=crop_pct,
    )


def timm_eval(pp: Preprocessing, image: Image.Image) -> np.ndarray:
    """Run timm's real eval transform for `pp` on a PIL image."""
    transform = create_transform(
        input_size=(3, *pp.input_size),
        interpolation=pp.interpolation,
        crop_pct=pp.crop_pct,
        mean=pp.mean,
        std=pp.std,
    )
    return transform(image).numpy()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Return a uniform-noise RGB image, the hardest case for resampling parity."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_image(width: int, height: int) -> Image.Image:
    """Return a photo-like image: gradients, soft blobs and mild noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    rng = np.random.default_rng(1)
    channels = [
        255 * u,
        255 * (0.5 + 0.5 * np.sin(6 * np.pi * u) * np.cos(4 * np.pi * v)),
        255 * np.exp(-((u - 0.4) ** 2 + (v - 0.6) ** 2) * 8),
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode an image with Pillow."""
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """Return a 1x1 PNG whose IHDR (with a valid CRC) claims width x height."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def decode(
    data: bytes,
    *,
    allowed_formats: frozenset[str] = DEFAULT_FORMATS,
    draft_size: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode with the test's default pixel limit."""
    return decode_image(
        data, max_pixels=MAX_PIXELS, allowed_formats=allowed_formats, draft_size=draft_size
    )


# --- timm parity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_size", "crop_pct", "expected"),
    [
        ((224, 224), 0.875, 256),
        ((224, 224), 0.9, 248),
        ((224, 224), 1.0, 224),
        ((256, 256), 0.95, 269),
    ],
)
def test_resize_size_matches_timm(
    input_size: tuple[int, int], crop_pct: float, expected: int
) -> None:
    pp = make_pp(crop_pct=crop_pct, input_size=input_size)
    timm_resize = create_transform(input_size=(3, *input_size), crop_pct=crop_pct).transforms[0]
    assert resize_size(pp) == expected == timm_resize.size


@pytest.mark.parametrize(
    ("size", "interpolation", "crop_pct", "input_size"),
    [
        ((320, 240), "bicubic", 0.9, (224, 224)),
        ((240, 500), "bicubic", 0.9, (224, 224)),
        ((320, 240), "bilinear", 0.875, (224, 224)),
        ((240, 500), "bilinear", 0.875, (224, 224)),
        ((257, 999), "lanczos", 0.95, (224, 224)),
        ((100, 60), "nearest", 0.875, (224, 224)),  # upscaling
        ((248, 300), "bicubic", 0.9, (224, 224)),  # shorter side already at target: no resize
        ((401, 299), "hamming", 1.0, (224, 224)),
        ((400, 300), "bicubic", 0.9, (192, 256)),  # non-square input: timm's ResizeKeepRatio
        ((300, 500), "box", 0.875, (256, 192)),
    ],
)
def test_preprocess_matches_timm_eval_transform(
    size: tuple[int, int], interpolation: str, crop_pct: float, input_size: tuple[int, int]
) -> None:
    pp = make_pp(interpolation, crop_pct, input_size)
    image = noise_image(*size)
    ours, theirs = preprocess(image, pp), timm_eval(pp, image)
    assert ours.shape == theirs.shape == (3, *input_size)
    # Measured 0.0: same Pillow resize, same float32 op order. 1e-6 leaves room for a few ulps.
    assert np.abs(ours - theirs).max() <= 1e-6


def test_preprocess_output_layout() -> None:
    out = preprocess(noise_image(320, 240), make_pp(input_size=(224, 192)))
    assert out.dtype == np.float32
    assert out.shape == (3, 224, 192)
    assert out.flags.c_contiguous


def test_preprocess_normalizes_with_mean_and_std() -> None:
    out = preprocess(Image.new("RGB", (300, 300), (255, 0, 128)), make_pp())
    expected = [
        (255 / 255 - IMAGENET_DEFAULT_MEAN[0]) / IMAGENET_DEFAULT_STD[0],
        (0 / 255 - IMAGENET_DEFAULT_MEAN[1]) / IMAGENET_DEFAULT_STD[1],
        (128 / 255 - IMAGENET_DEFAULT_MEAN[2]) / IMAGENET_DEFAULT_STD[2],
    ]
    np.testing.assert_allclose(out.reshape(3, -1).min(axis=1), expected, atol=1e-6)
    np.testing.assert_allclose(out.reshape(3, -1).max(axis=1), expected, atol=1e-6)


def test_preprocess_converts_non_rgb_input() -> None:
    grey = Image.new("L", (300, 260), 77)
    np.testing.assert_array_equal(
        preprocess(grey, make_pp()), preprocess(grey.convert("RGB"), make_pp())
    )


@pytest.mark.parametrize(("height", "width"), [(5, 7), (8, 3), (230, 10), (300, 224), (223, 225)])
def test_center_crop_pads_like_torchvision(height: int, width: int) -> None:
    pixels = np.asarray(noise_image(width, height))
    expected = np.asarray(tvf.center_crop(Image.fromarray(pixels), [224, 224]))
    np.testing.assert_array_equal(imaging.cpu._center_crop(pixels, (224, 224)), expected)


def test_extreme_aspect_ratio_resamples_only_the_crop() -> None:
    # timm would build a 248 x 14.88M-pixel intermediate here; we must stay small and fast.
    strip = Image.new("RGB", (60_000, 1), (10, 200, 30))
    out = preprocess(strip, make_pp())
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(
        out, preprocess(Image.new("RGB", (300, 300), (10, 200, 30)), make_pp()), atol=1e-6
    )


def test_crop_window_resample_stays_close_to_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the crop-window path.
    monkeypatch.setattr(imaging.preprocessing, "MAX_RESIZED_PIXELS", 0)
    image = smooth_image(600, 420)
    pp = make_pp()
    diff = np.abs(preprocess(image, pp) - timm_eval(pp, image))
    # Same geometry, only Pillow's float rounding differs: at most a level or two here and there.
    assert diff.mean() < 1e-3
    assert diff.max() < 3 / 255 / min(IMAGENET_DEFAULT_STD)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("interpolation", "cubic", "bicubic, bilinear, box, hamming, lanczos, nearest"),
        ("crop_mode", "squash", "center"),
        ("crop_pct", 0.0, r"\(0, 1\]"),
        ("crop_pct", 1.2, r"\(0, 1\]"),
        ("input_size", (0, 224), "input_size"),
        ("std", (0.2, 0.0, 0.2), "positive"),
    ],
)
def test_preprocessing_rejects_bad_config(field: str, value: object, match: str) -> None:
    params: dict[str, object] = {
        "input_size": (224, 224),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        field: value,
    }
    with pytest.raises(ValueError, match=match):
        Preprocessing(**params)  # type: ignore[arg-type]


# --- mode conversion -----------------------------------------------------------------------


def over_white(value: int, alpha: int) -> int:
    """Composite one 8-bit channel over white the way Pillow's alpha_composite rounds."""
    return (value * alpha + 255 * (255 - alpha)) // 255


def palette_image(transparent: bool) -> Image.Image:
    """Return a P image with index 0 = red, 1 = blue, pixel (0, 0) = index 0."""
    image = Image.new("P", (4, 4), 1)
    image.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    if transparent:
        image.info["transparency"] = 0
    return image


def high_bit(mode: str, value: int) -> Image.Image:
    """Return a 16/32-bit greyscale image filled with `value`."""
    dtypes = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}
    array = np.full((3, 3), value, dtype=dtypes[mode])
    return Image.frombytes(mode, (3, 3), array.tobytes())


MODE_CASES: list[tuple[str, Callable[[], Image.Image], tuple[int, int, int]]] = [
    ("1 off", lambda: Image.new("1", (3, 3), 0), (0, 0, 0)),
    ("1 on", lambda: Image.new("1", (3, 3), 1), WHITE),
    ("L", lambda: Image.new("L", (3, 3), 77), (77, 77, 77)),
    ("LA transparent", lambda: Image.new("LA", (3, 3), (10, 0)), WHITE),
    ("LA opaque", lambda: Image.new("LA", (3, 3), (10, 255)), (10, 10, 10)),
    ("LA half", lambda: Image.new("LA", (3, 3), (10, 128)), (over_white(10, 128),) * 3),
    ("P", lambda: palette_image(transparent=False), RED),
    ("P transparent", lambda: palette_image(transparent=True), WHITE),
    ("RGBA transparent red", lambda: Image.new("RGBA", (3, 3), (*RED, 0)), WHITE),
    ("RGBA opaque red", lambda: Image.new("RGBA", (3, 3), (*RED, 255)), RED),
    ("RGBA half red", lambda: Image.new("RGBA", (3, 3), (*RED, 128)), (255, 127, 127)),
    ("RGBa half red", lambda: Image.new("RGBa", (3, 3), (128, 0, 0, 128)), (255, 127, 127)),
    ("RGBa transparent", lambda: Image.new("RGBa", (3, 3), (0, 0, 0, 0)), WHITE),
    ("CMYK blank", lambda: Image.new("CMYK", (3, 3), (0, 0, 0, 0)), WHITE),
    ("CMYK red", lambda: Image.new("CMYK", (3, 3), (0, 255, 255, 0)), RED),
    ("CMYK black", lambda: Image.new("CMYK", (3, 3), (0, 0, 0, 255)), (0, 0, 0)),
    ("YCbCr white", lambda: Image.new("YCbCr", (3, 3), (255, 128, 128)), WHITE),
    ("I;16 max", lambda: high_bit("I;16", 65535), WHITE),
    ("I;16 257*100", lambda: high_bit("I;16", 25700), (100, 100, 100)),
    ("I;16 rounds down", lambda: high_bit("I;16", 257 * 100 + 128), (100, 100, 100)),
    ("I;16 rounds up", lambda: high_bit("I;16", 257 * 100 + 129), (101, 101, 101)),
    ("I;16B max", lambda: high_bit("I;16B", 65535), WHITE),
    ("I;16B 257*200", lambda: high_bit("I;16B", 51400), (200, 200, 200)),
    ("I 16-bit data", lambda: high_bit("I", 32896), (128, 128, 128)),
    ("I above 16 bits", lambda: high_bit("I", 1_000_000), WHITE),
    ("I negative", lambda: high_bit("I", -5), (0, 0, 0)),
    ("F", lambda: Image.new("F", (3, 3), 127.6), (128, 128, 128)),
    ("F over range", lambda: Image.new("F", (3, 3), 300.0), WHITE),
    ("F negative", lambda: Image.new("F", (3, 3), -1.0), (0, 0, 0)),
]


@pytest.mark.parametrize(
    ("factory", "expected"), [case[1:] for case in MODE_CASES], ids=[c[0] for c in MODE_CASES]
)
def test_to_rgb_converts_every_mode(
    factory: Callable[[], Image.Image], expected: tuple[int, int, int]
) -> None:
    rgb = to_rgb(factory())
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == expected


ENCODED_MODE_CASES: list[tuple[str, Callable[[], bytes], tuple[int, int, int]]] = [
    ("PNG 1-bit", lambda: encode(Image.new("1", (4, 4), 1), "PNG"), WHITE),
    ("PNG L", lambda: encode(Image.new("L", (4, 4), 90), "PNG"), (90, 90, 90)),
    ("PNG LA transparent", lambda: encode(Image.new("LA", (4, 4), (0, 0)), "PNG"), WHITE),
    ("PNG P tRNS", lambda: encode(palette_image(transparent=True), "PNG"), WHITE),
    ("PNG P", lambda: encode(palette_image(transparent=False), "PNG"), RED),
    ("PNG RGBA transparent", lambda: encode(Image.new("RGBA", (4, 4), (*RED, 0)), "PNG"), WHITE),
    ("PNG RGBA opaque", lambda: encode(Image.new("RGBA", (4, 4), (*RED, 255)), "PNG"), RED),
    ("PNG I;16", lambda: encode(high_bit("I;16", 65535), "PNG"), WHITE),
    ("PNG I;16 mid", lambda: encode(high_bit("I;16", 25700), "PNG"), (100, 100, 100)),
    ("GIF P", lambda: encode(palette_image(transparent=False), "GIF"), RED),
    ("BMP RGB", lambda: encode(Image.new("RGB", (4, 4), BLUE), "BMP"), BLUE),
    (
        "WEBP RGBA",
        lambda: encode(Image.new("RGBA", (4, 4), (*RED, 0)), "WEBP", lossless=True),
        WHITE,
    ),
    ("JPEG CMYK blank", lambda: encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), WHITE),
]


@pytest.mark.parametrize(
    ("factory", "expected"),
    [case[1:] for case in ENCODED_MODE_CASES],
    ids=[c[0] for c in ENCODED_MODE_CASES],
)
def test_decode_image_converts_stored_modes(
    factory: Callable[[], bytes], expected: tuple[int, int, int]
) -> None:
    decoded = decode(factory())
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == expected


def test_decode_image_reports_metadata() -> None:
    data = encode(Image.new("RGB", (40, 30), GREEN), "PNG")
    decoded = decode(data)
    assert (decoded.format, decoded.width, decoded.height) == ("PNG", 40, 30)
    assert decoded.num_bytes == len(data)
    assert decoded.image.size == (40, 30)


# --- orientation and animation -------------------------------------------------------------


def oriented_jpeg(orientation: int, exif_bytes: bytes | None = None) -> bytes:
    """Return a 40x20 blue JPEG with a red top-left quadrant and the given orientation."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif_bytes or exif.tobytes())


def assert_close_colour(actual: object, expected: tuple[int, int, int]) -> None:
    """Compare a JPEG pixel with a solid colour, allowing for compression error."""
    assert isinstance(actual, tuple)
    assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= 12, actual


def test_exif_orientation_6_rotates_clockwise() -> None:
    decoded = decode(oriented_jpeg(6))
    assert (decoded.width, decoded.height) == (40, 20)  # as stored
    assert decoded.image.size == (20, 40)  # upright
    # Stored top-left ends up top-right after a 90-degree clockwise turn.
    assert_close_colour(decoded.image.getpixel((17, 2)), RED)
    assert_close_colour(decoded.image.getpixel((2, 2)), BLUE)


@pytest.mark.parametrize(
    "exif_bytes",
    [
        b"Exif\x00\x00" + b"garbage!" * 4,
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12",  # IFD cut mid-entry
    ],
    ids=["garbage", "truncated-ifd"],
)
def test_malformed_exif_block_is_ignored(exif_bytes: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"
        decoded = decode(oriented_jpeg(1, exif_bytes))
    assert decoded.image.size == (40, 20)
    assert_close_colour(decoded.image.getpixel((2, 2)), RED)


def test_exif_parse_failure_falls_back_to_stored_orientation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    monkeypatch.setattr(Image.Image, "getexif", broken)
    # With orientation 6 readable, (10, 20) upright would allow a 1/2-scale draft; unreadable,
    # the request is taken as stored axes, which the 40x20 image cannot halve.
    decoded = decode(oriented_jpeg(6), draft_size=(10, 20))
    assert decoded.image.size == (40, 20)
    assert_close_colour(decoded.image.getpixel((2, 2)), RED)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("MPO", {})],
)
def test_animated_images_use_the_first_frame(fmt: str, params: dict[str, object]) -> None:
    first, *rest = (Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE))
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3  # really animated
    decoded = decode(data)
    assert decoded.format == fmt
    assert_close_colour(decoded.image.getpixel((8, 8)), RED)


# --- errors --------------------------------------------------------------------------------


def test_empty_body() -> None:
    with pytest.raises(EmptyImage, match="empty") as info:
        decode(b"")
    assert info.value.code == "empty_image"


@pytest.mark.parametrize(
    "data",
    [b"this is not an image, it is a sentence", np.random.default_rng(3).bytes(4096)],
    ids=["text", "random"],
)
def test_non_image_bytes(data: bytes) -> None:
    with pytest.raises(UnsupportedFormat, match="not a recognized image") as info:
        decode(data)
    assert info.value.code == "unsupported_format"
    assert "JPEG" in str(info.value)  # tells the user what to send instead


def test_tiff_is_refused_by_default_but_can_be_allowed() -> None:
    data = encode(Image.new("RGB", (8, 8), GREEN), "TIFF")
    with pytest.raises(UnsupportedFormat, match="TIFF") as info:
        decode(data)
    assert info.value.code == "unsupported_format"
    assert "BMP, GIF, JPEG, MPO, PNG, WEBP" in str(info.value)
    assert decode(data, allowed_formats=DEFAULT_FORMATS | {"TIFF"}).image.getpixel((0, 0)) == GREEN


def test_allowlist_restricts_formats_pillow_could_open() -> None:
    with pytest.raises(UnsupportedFormat, match=r"JPEG is not accepted.*PNG") as info:
        decode(encode(Image.new("RGB", (8, 8)), "JPEG"), allowed_formats=frozenset({"png"}))
    assert info.value.code == "unsupported_format"


def test_mpo_needs_its_own_allowlist_entry() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedFormat, match="MPO"):
        decode(data, allowed_formats=frozenset({"JPEG"}))
    assert decode(data, allowed_formats=frozenset({"MPO"})).format == "MPO"


def test_unknown_allowlist_name_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="JPG"):
        decode(b"x", allowed_formats=frozenset({"JPG"}))


@pytest.mark.parametrize(("fmt", "cut"), [("JPEG", 0.5), ("PNG", 0.5), ("GIF", 0.6), ("WEBP", 0.5)])
def test_truncated_image_is_corrupt(fmt: str, cut: float) -> None:
    data = encode(noise_image(64, 64), fmt)
    with pytest.raises(CorruptImage) as info:
        decode(data[: int(len(data) * cut)])
    assert info.value.code == "corrupt_image"
    assert fmt in str(info.value)


def test_damaged_header_of_allowed_format_is_corrupt() -> None:
    with pytest.raises(CorruptImage, match="PNG") as info:
        decode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert info.value.code == "corrupt_image"


def test_pixel_limit_is_checked_before_decoding() -> None:
    # The header claims 5000x5000 but only 1x1 of data follows: decoding would be CorruptImage.
    with pytest.raises(ImageTooLarge) as info:
        decode_image(png_claiming(5000, 5000), max_pixels=1_000_000)
    assert info.value.code == "image_too_large"
    assert "25,000,000" in str(info.value)
    assert "1,000,000" in str(info.value)


def test_pixel_limit_counts_stored_pixels() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, max_pixels=10_000).width == 100
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=9_999)


@pytest.mark.parametrize(("side"), [10_000, 100_000], ids=["bomb-warning", "bomb-error"])
def test_pillow_decompression_bomb_checks_become_image_too_large(side: int) -> None:
    filters_before = list(warnings.filters)
    with pytest.raises(ImageTooLarge, match="decompression bomb") as info:
        decode_image(png_claiming(side, side), max_pixels=10**12)
    assert info.value.code == "image_too_large"
    assert warnings.filters == filters_before  # no global warning state leaks out


def test_concurrent_decodes_leave_warning_filters_alone() -> None:
    # catch_warnings swaps a process-global list; without the module's lock, threads switching
    # inside it restore each other's filters and leak "error" filters (8 of 10 runs, measured).
    filters_before = list(warnings.filters)
    jobs = [png_claiming(10_000, 10_000), encode(Image.new("RGB", (8, 8), RED), "PNG")] * 300

    def run(data: bytes) -> str:
        try:
            return decode_image(data, max_pixels=10**12).format
        except ImageError as exc:
            return exc.code

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to provoke the race
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(run, jobs))
    finally:
        sys.setswitchinterval(interval)
    assert results == ["image_too_large", "PNG"] * 300
    assert warnings.filters == filters_before


def test_error_classes_share_a_base_and_codes() -> None:
    codes = {cls: cls.code for cls in (EmptyImage, UnsupportedFormat, ImageTooLarge, CorruptImage)}
    assert all(issubclass(cls, ImageError) for cls in codes)
    assert sorted(codes.values()) == [
        "corrupt_image",
        "empty_image",
        "image_too_large",
        "unsupported_format",
    ]


# --- JPEG draft ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_photo() -> Image.Image:
    """A 3000x2000 photo-like image."""
    return smooth_image(3000, 2000)


@pytest.fixture(scope="module")
def large_jpeg(large_photo: Image.Image) -> bytes:
    """The 3000x2000 photo as a JPEG."""
    return encode(large_photo, "JPEG", quality=90)


def test_draft_decodes_large_jpeg_at_reduced_scale(large_jpeg: bytes) -> None:
    pp = make_pp()
    target = resize_size(pp)
    drafted = decode(large_jpeg, draft_size=(target, target))
    assert (drafted.width, drafted.height) == (3000, 2000)  # stored size, not drafted size
    assert drafted.image.size == (375, 250)  # 1/8 scale: min(3000 // 248, 2000 // 248) = 8
    assert min(drafted.image.size) >= target


def test_decode_and_preprocess_is_exact_unless_draft_is_asked_for(large_jpeg: bytes) -> None:
    pp = make_pp()
    exact, decoded = decode_and_preprocess(large_jpeg, pp, max_pixels=MAX_PIXELS)
    assert decoded.image.size == (3000, 2000)
    np.testing.assert_array_equal(exact, preprocess(decode(large_jpeg).image, pp))


def test_draft_output_stays_close_to_full_decode(large_jpeg: bytes) -> None:
    pp = make_pp()
    drafted, decoded = decode_and_preprocess(large_jpeg, pp, max_pixels=MAX_PIXELS, draft=True)
    assert decoded.image.size == (375, 250)
    full = preprocess(decode(large_jpeg).image, pp)
    diff = np.abs(drafted - full)
    # Measured: mean 0.0079, max 0.052 (normalized units; one 8-bit level is about 0.017).
    assert diff.mean() < 0.05
    assert diff.max() < 0.25


def test_draft_skipped_below_twice_the_target() -> None:
    data = encode(smooth_image(480, 400), "JPEG")
    assert decode(data, draft_size=(248, 248)).image.size == (480, 400)


def test_draft_size_accounts_for_exif_rotation(large_photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(large_photo, "JPEG", exif=exif.tobytes())
    # Upright the image is 2000x3000; asking for >= 300x1200 allows a 1/2-scale decode only.
    decoded = decode(data, draft_size=(300, 1200))
    assert decoded.image.size == (1000, 1500)


def test_draft_ignored_for_non_jpeg() -> None:
    data = encode(Image.new("RGB", (1200, 1000), GREEN), "PNG")
    assert decode(data, draft_size=(248, 248)).image.size == (1200, 1000)


def test_decode_and_preprocess_small_image_matches_timm() -> None:
    image = noise_image(300, 280)
    pp = make_pp()
    out, decoded = decode_and_preprocess(encode(image, "PNG"), pp, max_pixels=MAX_PIXELS)
    assert decoded.format == "PNG"
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and out.flags.c_contiguous
    assert np.abs(out - timm_eval(pp, image)).max() <= 1e-6


def test_draft_keeps_both_sides_for_non_square_input(large_jpeg: bytes) -> None:
    pp = make_pp(input_size=(192, 256))  # timm resize target (h, w) = (213, 284)
    out, decoded = decode_and_preprocess(large_jpeg, pp, max_pixels=MAX_PIXELS, draft=True)
    assert decoded.image.size == (375, 250)  # 1/8 scale still covers 284 x 213
    full = preprocess(decode(large_jpeg).image, pp)
    assert out.shape == (3, 192, 256)
    assert np.abs(out - full).mean() < 0.05
