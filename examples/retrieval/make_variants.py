"""Write near-duplicate variants of real photos, a small retrieval set with known answers.

    python examples/retrieval/make_variants.py /tmp/photos

Photos: examples/grace_hopper.jpg plus the eight colour photographs that ship inside the
scikit-image wheel when it is installed (nothing is downloaded). Each
photo becomes five files, `<photo>__<variant>.jpg`: a re-encode, a mirror image, two crops and a
heavily compressed copy, so "the nearest other image is a variant of the same photo" is a
checkable retrieval answer.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

REPO_PHOTO = Path(__file__).resolve().parents[1] / "grace_hopper.jpg"
_SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
    "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
)  # fmt: skip


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locate without importing the package
    return Path(spec.origin).parent if spec and spec.origin else None


def real_photos() -> list[Path]:
    """Return the real photographs available on this machine (at least the repository's)."""
    photos = [REPO_PHOTO]
    skimage = _package_dir("skimage")
    if skimage is not None:
        photos += [
            skimage / "data" / n for n in _SKIMAGE_PHOTOS if (skimage / "data" / n).is_file()
        ]
    return photos


def _crop(image: Image.Image, keep: float, dx: float, dy: float) -> Image.Image:
    width, height = image.size
    w, h = int(width * keep), int(height * keep)
    left, top = int((width - w) * dx), int((height - h) * dy)
    return image.crop((left, top, left + w, top + h))


VARIANTS: dict[str, tuple[Callable[[Image.Image], Image.Image], int]] = {
    "reencoded": (lambda im: im, 90),
    "mirrored": (ImageOps.mirror, 90),
    "center_crop": (lambda im: _crop(im, 0.8, 0.5, 0.5), 90),
    "corner_crop": (
        lambda im: _crop(im, 0.85, 0.0, 1.0).resize((im.width // 2, im.height // 2)),
        85,
    ),
    "low_quality": (lambda im: im, 20),
}


def write_variants(out_dir: Path, photos: list[Path] | None = None) -> dict[str, list[Path]]:
    """Write every variant of every photo as JPEG; return {photo stem: [variant paths]}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for photo in photos or real_photos():
        with Image.open(photo) as opened:
            image = opened.convert("RGB")
        for name, (transform, quality) in VARIANTS.items():
            buffer = io.BytesIO()
            transform(image).save(buffer, format="JPEG", quality=quality)
            path = out_dir / f"{photo.stem}__{name}.jpg"
            path.write_bytes(buffer.getvalue())
            written.setdefault(photo.stem, []).append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "photos")
    groups = write_variants(target)
    print(f"wrote {sum(map(len, groups.values()))} images of {len(groups)} photos to {target}")
