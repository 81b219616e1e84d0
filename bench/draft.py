"""What reduced-scale JPEG decode (`--jpeg-draft`) buys in decode time and costs in agreement.

For each upload size, real photos (the one in examples/ and, where scikit-image is installed,
its sample photographs) are resized to that size and JPEG-encoded; each is then decoded and
cropped exactly and with draft, timed on one thread, and both crops run through the model.
Sources are at most 512x600, so the larger sizes are upscaled: smoother than a real 12 MP
photo, which makes the agreement figures a best case.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
from PIL import Image

from bench.photos import ROOT, encode
from model.parity import cosine
from service.imaging import Preprocessing, crop, decode_image, draft_size
from service.runtime.feed import normalize

SIZES = ((500, 375), (1024, 768), (1920, 1080), (4000, 3000))


def _sources() -> list[Image.Image]:
    try:
        from bench.photos import originals

        return list(originals().values())
    except ImportError:  # no scikit-image (not a dev install): the photo in examples/ alone
        return [Image.open(ROOT / "examples" / "grace_hopper.jpg").convert("RGB")]


def _decode_crop(data: bytes, pp: Preprocessing, draft: bool) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    image = decode_image(data, max_pixels=50_000_000, draft_size=draft_size(pp) if draft else None)
    pixels = crop(image.image, pp)
    return pixels, time.perf_counter() - started


def measure(
    pp: Preprocessing, infer: Any, *, photos: int = 6, repeats: int = 3
) -> list[dict[str, Any]]:
    """Return, per size, decode+crop ms exact vs draft and the agreement of their outputs."""
    sources = _sources()[:photos]
    out = []
    for width, height in SIZES:
        exact_ms: list[float] = []
        draft_ms: list[float] = []
        exact_crops: list[np.ndarray] = []
        draft_crops: list[np.ndarray] = []
        for source in sources:
            data = encode(source.resize((width, height), Image.Resampling.LANCZOS), quality=90)
            for _ in range(repeats):
                exact, t_exact = _decode_crop(data, pp, draft=False)
                drafted, t_draft = _decode_crop(data, pp, draft=True)
                exact_ms.append(1e3 * t_exact)
                draft_ms.append(1e3 * t_draft)
            exact_crops.append(normalize(exact, pp.mean, pp.std))
            draft_crops.append(normalize(drafted, pp.mean, pp.std))
        a, b = np.stack(exact_crops), np.stack(draft_crops)
        logits_a, emb_a = infer(a)
        logits_b, emb_b = infer(b)
        top_a = np.argsort(-logits_a, axis=1, kind="stable")[:, :5]
        top_b = np.argsort(-logits_b, axis=1, kind="stable")[:, :5]
        cos = cosine(emb_a, emb_b)
        exact_med, draft_med = statistics.median(exact_ms), statistics.median(draft_ms)
        out.append(
            {
                "size": f"{width}x{height}",
                "photos": len(sources),
                "exact_ms": exact_med,
                "draft_ms": draft_med,
                "speedup": exact_med / draft_med,
                "input_mean_abs_diff": float(np.abs(a - b).mean()),
                "input_max_abs_diff": float(np.abs(a - b).max()),
                "embedding_min_cosine": float(cos.min()),
                "embedding_mean_cosine": float(cos.mean()),
                "top5_overlap": float(
                    np.mean([len(set(x) & set(y)) / 5 for x, y in zip(top_a, top_b, strict=True)])
                ),
            }
        )
    return out
