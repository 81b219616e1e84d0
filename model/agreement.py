"""Measure how far a reduced-precision artifact's answers move from fp32 on real photos.

Random inputs (what `parity` uses) say nothing about quantization error on natural images,
whose activations have different ranges. So the photos are real: a calibration set shipped
with the package (`model/calibration/`, views of the public-domain photograph in examples/, so a
production install without the dev extras can still check an export), or any folder of JPEGs
and PNGs given with `--calibration-dir`. They are preprocessed the way timm's eval transform
does it (resize the shorter side to size / crop_pct, bicubic, centre crop, normalise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from model.artifacts import AgreementFigures
from model.parity import Runner, cosine
from model.variants import Variant

CALIBRATION_DIR = Path(__file__).with_name("calibration")
# Below this embedding cosine against fp32 on any photo, a reduced precision is refused.
MIN_COSINE = 0.999
_SUFFIXES = {".jpg", ".jpeg", ".png"}


def calibration_photos(folder: Path | None = None) -> list[Path]:
    """List the photos to measure on: `folder`, or the set shipped with the package."""
    where = CALIBRATION_DIR if folder is None else Path(folder)
    photos = sorted(p for p in where.iterdir() if p.suffix.lower() in _SUFFIXES)
    if not photos:
        raise ValueError(f"{where} holds no .jpg/.jpeg/.png photos to measure agreement on")
    return photos


def eval_batch(photos: Sequence[Path], variant: Variant) -> np.ndarray:
    """Preprocess photos as timm's eval transform does: [N, 3, H, W] float32, normalised."""
    height, width = variant.input_size
    # timm: scale_size = floor(size / crop_pct) for the shorter side (square inputs here).
    scale = math.floor(min(height, width) / variant.crop_pct)
    resample = Image.Resampling[variant.interpolation.upper()]
    mean = np.asarray(variant.mean, np.float32)[:, None, None]
    std = np.asarray(variant.std, np.float32)[:, None, None]
    out = []
    for path in photos:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        # torchvision's Resize(int) truncates the longer side, as here.
        size = (scale, int(h * scale / w)) if w <= h else (int(w * scale / h), scale)
        resized = rgb.resize(size, resample)
        left = round((resized.width - width) / 2)
        top = round((resized.height - height) / 2)
        crop = resized.crop((left, top, left + width, top + height))
        chw = np.asarray(crop, np.float32).transpose(2, 0, 1) / 255.0
        out.append((chw - mean) / std)
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def on_photos(
    reference: Runner,
    candidate: Runner,
    variant: Variant,
    *,
    weights_random: bool,
    calibration_dir: Path | None = None,
) -> AgreementFigures:
    """Measure agreement on `calibration_dir`'s photos (default: the packaged set)."""
    return measure_agreement(
        reference,
        candidate,
        eval_batch(calibration_photos(calibration_dir), variant),
        source=str(calibration_dir) if calibration_dir else "packaged (model/calibration)",
        weights_random=weights_random,
        min_cosine=MIN_COSINE,  # read now, so a caller (or test) can tighten it
    )


def measure_agreement(
    reference: Runner,
    candidate: Runner,
    batch: np.ndarray,
    *,
    source: str,
    weights_random: bool,
    min_cosine: float = MIN_COSINE,
) -> AgreementFigures:
    """Compare embeddings (cosine) and top-1 / top-5 classes of `candidate` with `reference`."""
    ref_logits, ref_emb = reference(batch)
    logits, emb = candidate(batch)
    cos = cosine(emb, ref_emb)
    top1 = float(np.mean(ref_logits.argmax(1) == logits.argmax(1))) if logits.size else 1.0
    k = min(5, ref_logits.shape[1])
    ref_top = np.argsort(-ref_logits, axis=1, kind="stable")[:, :k]
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, top, strict=True)]))
    return AgreementFigures(
        photos=len(batch),
        source=source,
        embedding_min_cosine=float(cos.min()),
        embedding_mean_cosine=float(cos.mean()),
        top1_agreement=top1,
        top5_overlap=overlap,
        weights_random=weights_random,
        min_cosine_bound=min_cosine,
        passed=float(cos.min()) >= min_cosine,
    )
