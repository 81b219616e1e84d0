"""Device JPEG decoders against the exact CPU path: agreement, speed, and CPU time saved.

For `make gpu-check`. Each decoder (nvImageCodec with fancy upsampling, torchvision's nvJPEG)
decodes and crops the photo set on the GPU; the same model embeds its crops and the exact Pillow
path's, and the embeddings and top-5 classes are compared. Then it times decode + crop on
batches of 500x375 JPEGs and counts the process CPU time per image against Pillow's, which is
what device decode exists to save.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.imaging import Preprocessing, cpu
from service.imaging.device import TensorDecoder

DECODERS = ("nvimgcodec", "torchvision")
# What device decode must reach before it could become the default.
MIN_COSINE = 0.999
MIN_TOP5_IDENTICAL = 0.97
MAX_PIXELS = 10**9

# uint8 [3, H, W] crops (arrays or device tensors) -> (logits, embeddings), both [N, ...].
Embed = Callable[[Sequence[Any]], tuple[np.ndarray, np.ndarray]]


def decoder_rows(
    embed: Embed,
    pp: Preprocessing,
    photos: dict[str, bytes],
    device: str,
    *,
    decoders: Sequence[str] = DECODERS,
    batch_size: int = 64,
    repeats: int = 10,
) -> list[dict[str, Any]]:
    """One row per decoder: agreement with the exact CPU path, img/s, CPU seconds saved."""
    exact = [
        cpu.crop(cpu.decode_image(d, max_pixels=MAX_PIXELS).image, pp) for d in photos.values()
    ]
    reference = embed(exact)
    small = [d for name, d in photos.items() if name.endswith("-500x375")]
    batch = list(itertools.islice(itertools.cycle(small), batch_size))
    pillow_cpu = pillow_cpu_seconds(batch, pp)
    rows = []
    for name in decoders:
        row: dict[str, Any] = {"decoder": name}
        try:
            decoder = TensorDecoder(pp, device, max_pixels=MAX_PIXELS, decoder=name)  # type: ignore[arg-type]
            decoded = decoder.decode_batch(list(photos.values()))
            crops = decoded.crops
            refused = [c for c in crops if isinstance(c, Exception)]
            if refused:
                raise RuntimeError(f"refused {len(refused)} photos: {refused[0]}")
            row |= agreement(reference, embed(crops))
            row["fallbacks_to_pillow"] = decoded.cpu_fallbacks
            row |= speed(decoder, batch, repeats)
        except Exception as exc:  # report it: the other decoder may still work
            rows.append(row | {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        row["pillow_cpu_ms_per_image"] = round(pillow_cpu * 1e3, 3)
        row["cpu_ms_saved_per_image"] = round((pillow_cpu - row["cpu_s_per_image"]) * 1e3, 3)
        row["cpu_s_per_image"] = round(row["cpu_s_per_image"], 6)
        rows.append(row)
    return rows


def agreement(
    reference: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Embedding cosine (min, mean) and the share of identical top-5s, with the verdict."""
    (ref_logits, ref_emb), (logits, emb) = reference, got
    cosine = (ref_emb * emb).sum(1) / (
        np.linalg.norm(ref_emb, axis=1) * np.linalg.norm(emb, axis=1)
    )
    top5 = np.argsort(-ref_logits, axis=1)[:, :5], np.argsort(-logits, axis=1)[:, :5]
    identical = float((top5[0] == top5[1]).all(axis=1).mean())  # same classes, same order
    return {
        "ok": bool(cosine.min() >= MIN_COSINE and identical >= MIN_TOP5_IDENTICAL),
        "images": len(emb),
        "cosine_min": round(float(cosine.min()), 6),
        "cosine_mean": round(float(cosine.mean()), 6),
        "top5_identical": round(identical, 4),
    }


def speed(decoder: TensorDecoder, batch: list[bytes], repeats: int) -> dict[str, float]:
    """Decode + crop img/s on `batch`, and the process CPU seconds it spends per image."""
    decoder.decode_batch(batch)  # warm-up: decoder state, CUDA kernels, memory pools
    wall, cpu_time = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        decoder.decode_batch(batch)  # returns after the device finished (it synchronizes)
    wall, cpu_time = time.perf_counter() - wall, time.process_time() - cpu_time
    images = repeats * len(batch)
    return {"img_per_s": round(images / wall, 1), "cpu_s_per_image": cpu_time / images}


def pillow_cpu_seconds(batch: list[bytes], pp: Preprocessing) -> float:
    """Process CPU seconds per image of the exact Pillow decode + crop."""
    started = time.process_time()
    for data in batch:
        cpu.crop(cpu.decode_image(data, max_pixels=MAX_PIXELS).image, pp)
    return (time.process_time() - started) / len(batch)


def check_device_decoders(
    repo: Path, trt_cache: Path, device: str = "cuda:0"
) -> list[dict[str, Any]]:
    """Run `decoder_rows` on the photo set with ONNX Runtime CUDA fp32 as the model."""
    from bench.gpu_check import GpuPath, _open
    from bench.photos import jpeg_set
    from service.runtime.providers import CUDA

    path = GpuPath("onnx-cuda-fp32", "onnx", "fp32", (CUDA,))
    backend, feeder, pp = _open(repo, path, device, 64, trt_cache)

    def embed(crops: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        outs = [backend.infer(feeder(crops[i : i + 64])) for i in range(0, len(crops), 64)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    try:
        return decoder_rows(embed, pp, jpeg_set(), device)
    finally:
        backend.close()


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Print one line per decoder with PASS or FAIL against the targets."""
    targets = f"cosine min >= {MIN_COSINE}, identical top-5 >= {MIN_TOP5_IDENTICAL:.0%}"
    print(f"\ndevice decode vs the exact CPU path ({targets}; not part of the exit code):")
    for r in rows:
        if "error" in r:
            print(f"  {r['decoder']:12} FAIL  {r['error'][:150]}")
            continue
        print(f"  {r['decoder']:12} {'PASS' if r['ok'] else 'FAIL'}  cos min {r['cosine_min']:.6f}"
              f" mean {r['cosine_mean']:.6f}  top-5 identical {r['top5_identical']:.1%}"
              f"  {r['img_per_s']:.0f} img/s  CPU saved {r['cpu_ms_saved_per_image']:.2f} ms/img"
              f"  (Pillow {r['pillow_cpu_ms_per_image']:.2f})")  # fmt: skip
