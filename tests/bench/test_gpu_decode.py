"""bench/gpu_decode.py's rows, run here with both decoders on CPU tensors and the test model."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from bench import gpu_decode
from bench.photos import jpeg_set
from model.hiera import BuiltModel
from service.runtime.feed import normalize
from tests.service.helpers import MICRO_PP
from tests.service.imaging.fake_nvimgcodec import FakeNvImageCodec


def test_both_decoders_meet_the_targets_on_cpu_tensors(
    micro_model: BuiltModel, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", FakeNvImageCodec())

    def embed(crops: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.stack([np.asarray(c) for c in crops])
        with torch.inference_mode():
            logits, emb = micro_model.module(
                torch.from_numpy(normalize(pixels, MICRO_PP.mean, MICRO_PP.std))
            )
        return logits.numpy(), emb.numpy()

    photos = jpeg_set()
    rows = gpu_decode.decoder_rows(embed, MICRO_PP, photos, "cpu", batch_size=8, repeats=1)

    assert [r["decoder"] for r in rows] == ["nvimgcodec", "torchvision"]
    for row in rows:
        assert row["ok"] and row["images"] == len(photos) == 34, row
        assert row["cosine_min"] >= 0.999 and row["top5_identical"] >= 0.97
        assert row["fallbacks_to_pillow"] == 0 and row["img_per_s"] > 0
        assert row["pillow_cpu_ms_per_image"] > 0
        expected = row["pillow_cpu_ms_per_image"] - row["cpu_s_per_image"] * 1e3
        assert row["cpu_ms_saved_per_image"] == pytest.approx(expected, abs=0.01)
    gpu_decode.print_rows(rows)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed[-2:]] == [
        ["nvimgcodec", "PASS"],
        ["torchvision", "PASS"],
    ]


def test_a_decoder_that_cannot_start_is_a_failed_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)

    def embed(crops: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(crops), 10)), np.ones((len(crops), 4))

    rows = gpu_decode.decoder_rows(embed, MICRO_PP, jpeg_set(), "cpu", decoders=["nvimgcodec"])

    assert rows[0]["ok"] is False and "nvImageCodec cannot start" in rows[0]["error"]


def test_the_verdict_fails_embeddings_of_other_images_and_reordered_top5() -> None:
    rng = np.random.default_rng(0)
    logits, emb = rng.standard_normal((40, 10)), rng.standard_normal((40, 6))
    same = gpu_decode.agreement((logits, emb), (logits.copy(), emb.copy()))
    shuffled = gpu_decode.agreement((logits, emb), (logits[::-1], emb[::-1]))
    top = np.argsort(-logits, axis=1)
    swapped = logits.copy()
    rows = np.arange(40)[:2]  # swap the first and second class of two images: 95% identical
    swapped[rows, top[rows, 0]], swapped[rows, top[rows, 1]] = (
        logits[rows, top[rows, 1]],
        logits[rows, top[rows, 0]],
    )
    reordered = gpu_decode.agreement((logits, emb), (swapped, emb))

    assert same["ok"] and same["cosine_min"] == pytest.approx(1.0) and same["top5_identical"] == 1
    assert not shuffled["ok"] and shuffled["cosine_min"] < 0.9
    assert not reordered["ok"] and reordered["top5_identical"] == 0.95
