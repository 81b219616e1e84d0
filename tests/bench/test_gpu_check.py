"""`make gpu-check`: skipped (77) without a GPU, and its comparisons run here on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu_check
from bench.gpu_check import GpuPath, agreement, check_paths
from bench.photos import jpeg_set


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make gpu-check runs")
def test_without_a_gpu_it_says_so_and_exits_77(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([]) == gpu_check.SKIPPED == 77
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_every_cpu_runnable_path_agrees_with_cpu_fp32_on_real_photos(
    micro_repository: Path, tmp_path: Path
) -> None:
    paths = [
        GpuPath("onnx-fp16-artifact", "onnx", "fp16"),
        GpuPath("torchscript-fp32", "torchscript", "fp32"),
        GpuPath("eager-bf16", "eager", "bf16"),
        GpuPath("tensor-decode+onnx-fp32", "onnx", "fp32", device_decode=True),
        GpuPath("torchscript-fp16-on-cpu", "torchscript", "fp16"),  # refused on a CPU
    ]
    rows = {r["path"]: r for r in check_paths(micro_repository, "cpu", paths, jpeg_set(), tmp_path)}

    for name in ("onnx-fp16-artifact", "torchscript-fp32", "eager-bf16", "tensor-decode+onnx-fp32"):
        assert rows[name]["ok"], rows[name]
        assert rows[name]["images"] == len(jpeg_set())
    assert rows["torchscript-fp32"]["cosine_min"] >= 0.99999
    assert rows["torchscript-fp32"]["top5_agreement"] == 1.0
    assert rows["tensor-decode+onnx-fp32"]["cosine_min"] >= 0.999
    failed = rows["torchscript-fp16-on-cpu"]
    assert not failed["ok"] and "fp16 autocast is a GPU feature" in failed["error"]


def test_agreement_fails_outputs_that_belong_to_other_images() -> None:
    rng = np.random.default_rng(0)
    logits, embedding = rng.standard_normal((8, 10)), rng.standard_normal((8, 6))
    same = agreement((logits, embedding), (logits.copy(), embedding.copy()), "fp32")
    shuffled = agreement((logits, embedding), (logits[::-1], embedding[::-1]), "fp32")

    assert same["ok"] and same["cosine_min"] == pytest.approx(1.0) and same["top5_agreement"] == 1
    assert not shuffled["ok"] and shuffled["cosine_min"] < 0.9


def test_errors_keep_the_end_of_long_messages_where_torchscript_puts_the_cause() -> None:
    cause = "RuntimeError: Expected all tensors to be on the same device"
    text = gpu_check._error(RuntimeError("Traceback of TorchScript ..." + "x" * 5000 + cause))
    assert text.startswith("RuntimeError: ...") and text.endswith(cause) and len(text) < 1000
    assert gpu_check._error(ValueError("short")) == "ValueError: short"


def test_worst_photos_names_the_least_agreeing_ones() -> None:
    rng = np.random.default_rng(1)
    logits, embedding = rng.standard_normal((4, 10)), rng.standard_normal((4, 6))
    moved = embedding.copy()
    moved[2] = -moved[2]  # photo "c" disagrees completely
    worst = gpu_check.worst_photos((logits, embedding), (logits, moved), "abcd", count=2)
    assert next(iter(worst)) == "c" and worst["c"] == pytest.approx(-1.0)
    assert len(worst) == 2
