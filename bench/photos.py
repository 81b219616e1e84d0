"""Real photographs for agreement checks: the photo in examples/ plus scikit-image's sample photos.

Used by the tests (CPU vs tensor decoder) and by `make gpu-check` (every GPU path vs CPU fp32).

Each is re-encoded as JPEG at the sizes real uploads come in, and in the forms decoders trip on
(EXIF rotation, greyscale, progressive, 4:4:4 chroma), so every decoder sees the same set.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the repository (examples/ sits beside bench/)
# Photographs only (no charts, text or micrographs of synthetic patterns).
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "camera.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "ihc.png",
)


def originals() -> dict[str, Image.Image]:
    """Return the source photographs as RGB images, by name."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = {"grace_hopper": Image.open(ROOT / "examples" / "grace_hopper.jpg")}
    photos |= {name.split(".")[0]: Image.open(folder / name) for name in SKIMAGE_PHOTOS}
    return {name: image.convert("RGB") for name, image in photos.items()}


def encode(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def resized_jpeg(width: int, height: int, source: Path | None = None) -> bytes:
    """Return a photo (the one in examples/ by default) as a quality-90 JPEG of the given size."""
    with Image.open(source or ROOT / "examples" / "grace_hopper.jpg") as photo:
        resized = photo.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    return encode(resized, quality=90)


@functools.cache
def jpeg_set() -> dict[str, bytes]:
    """Return about forty real-photo JPEGs, by a name that says how each was made."""
    out: dict[str, bytes] = {}
    for name, image in originals().items():
        out[f"{name}-as-is"] = encode(image, quality=90)
        out[f"{name}-500x375"] = encode(image.resize((500, 375), Image.Resampling.LANCZOS))
    hopper, astronaut = originals()["grace_hopper"], originals()["astronaut"]
    big = hopper.resize((1024, 1200), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers rotate it 90 degrees clockwise
    out["grace_hopper-1024x1200"] = encode(big)
    out["grace_hopper-exif-rotated"] = encode(big.transpose(Image.Transpose.ROTATE_90), exif=exif)
    out["grace_hopper-greyscale"] = encode(hopper.convert("L"))
    out["astronaut-progressive"] = encode(astronaut, progressive=True, quality=80)
    out["astronaut-444"] = encode(astronaut, subsampling=0, quality=95)
    out["astronaut-q40"] = encode(astronaut, quality=40)
    out["astronaut-1920x1080"] = encode(astronaut.resize((1920, 1080)), quality=85)
    out["coffee-tall-300x900"] = encode(originals()["coffee"].resize((300, 900)))
    return out
