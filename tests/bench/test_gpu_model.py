"""The GPU model figures' rows, built on the CPU: failures become error strings, not crashes."""

from __future__ import annotations

import numpy as np

from bench.gpu_model import IDENTITY_PATHS, MODEL_PATHS, compared, measured


def test_a_row_holds_each_size_or_why_it_failed() -> None:
    def measure(size: int) -> float:
        if size == 128:
            raise RuntimeError("CUDA out of memory")
        return 1000.4

    row = measured("eager-fp16+graphs", [64, 128], measure)
    assert row == {
        "path": "eager-fp16+graphs",
        "batch_64_img_per_s": 1000,
        "batch_128_img_per_s": "failed: RuntimeError: CUDA out of memory",
    }


def test_identity_rows_say_whether_the_bits_match_and_by_how_much() -> None:
    logits = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    embedding = np.ones((2, 3), np.float32)
    nudged = embedding.copy()
    nudged[1, 2] = np.nextafter(np.float32(1.0), np.float32(2.0))

    same = compared("p", (logits, embedding), (logits.copy(), embedding.copy()))
    assert same == {"path": "p", "images": 2, "bit_identical": True, "max_abs_diff": 0.0}
    off = compared("p", (logits, embedding), (logits, nudged))
    assert off["bit_identical"] is False
    assert off["max_abs_diff"] == float(np.float32(2.0**-23))


def test_every_runtime_is_measured_with_and_without_graphs() -> None:
    names = {p.name for p in MODEL_PATHS}
    for base in ("eager-fp16", "torchscript-fp16", "onnx-cuda-fp16", "onnx-cuda-fp32"):
        assert {base, f"{base}+graphs"} <= names
    assert {"onnx-tensorrt-fp16", "onnx-tensorrt-fp32", "eager-fp16+compile"} <= names
    assert all(p.graphs for p in IDENTITY_PATHS) and len(IDENTITY_PATHS) == 4
