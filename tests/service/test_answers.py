"""Served answers against references built without the service: timm, and the official package.

The expected values never go through service code: see tests/service/reference.py.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from model.export import export_repository
from model.hiera import BuiltModel, build
from model.variants import Variant, custom_variant
from service.app import create_app
from tests.conftest import MICRO_KWARGS
from tests.service.helpers import repository_settings, running, serving
from tests.service.reference import (
    EMBEDDING_ATOL,
    model_input,
    photos,
    probabilities,
    reference,
    top_indices,
)


async def test_real_photos_get_timms_answer(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    # JPEG and PNG, greyscale, palette, EXIF-rotated; each resized and cropped. The expected
    # values come from timm's own transform and forward, so any drift in the served decode,
    # resize, crop, channel order or normalisation fails here.
    uploads = photos()
    app = create_app(repository_settings(micro_repository, max_delay_ms=50.0))
    async with running(app) as client:

        def post(path: str, data: bytes, kind: str) -> Awaitable[httpx.Response]:
            return client.post(path, content=data, headers={"Content-Type": kind})

        embedded = await asyncio.gather(
            *(post("/v1/embed?normalize=false", *upload) for upload in uploads.values())
        )
        classified = await asyncio.gather(
            *(post("/v1/classify?top_k=5", *upload) for upload in uploads.values())
        )
    assert [r.status_code for r in embedded + classified] == [200] * 2 * len(uploads)
    assert max(r.json()["timing"]["batch_size"] for r in embedded) > 1
    for name, embed, classify in zip(uploads, embedded, classified, strict=True):
        logits, want = reference(micro_model, uploads[name][0])
        got = np.asarray(embed.json()["embedding"], np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=EMBEDDING_ATOL, err_msg=name)
        labels = classify.json()["labels"]
        assert [e["index"] for e in labels] == top_indices(logits, 5), name
        scores = probabilities(logits)
        assert [e["score"] for e in labels] == pytest.approx(
            [scores[e["index"]] for e in labels], rel=1e-4
        ), name


@pytest.fixture(scope="module")
def micro_256_model() -> BuiltModel:
    """hiera_small_abswin_256's configuration (256 px, crop_pct 0.95) at micro size."""
    return build(
        custom_variant("hiera_small_abswin_256", "hiera_micro_256", **MICRO_KWARGS), "random"
    )


@pytest.fixture(scope="module")
def micro_256_repository(
    tmp_path_factory: pytest.TempPathFactory, micro_256_model: BuiltModel
) -> Path:
    # ONNX too: the antialiased bicubic resize of its position embedding, which no ONNX opset
    # exports, is computed once at build (model.hiera.freeze_window_pos_embed).
    root = tmp_path_factory.mktemp("model_repository_256")
    return export_repository(micro_256_model, root, formats=("onnx", "torchscript"))


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
async def test_a_second_preprocessing_config_is_served_as_timm_defines_it(
    micro_256_repository: Path, micro_256_model: BuiltModel, backend: str
) -> None:
    # Not 224 px nor crop_pct 0.9: a constant of the first config anywhere in the served
    # path fails here.
    uploads = {name: photos()[name] for name in ("jpeg-512x600", "png-500x375")}
    settings = repository_settings(micro_256_repository, backend=backend)
    async with running(create_app(settings)) as client:
        answers = [
            await client.post(
                "/v1/embed?normalize=false", content=data, headers={"Content-Type": kind}
            )
            for data, kind in uploads.values()
        ]
        models = (await client.get("/v1/models")).json()["models"][0]
    assert models["input_size"] == [256, 256]
    for (name, (data, _)), answer in zip(uploads.items(), answers, strict=True):
        assert answer.status_code == 200, answer.text
        _, want = reference(micro_256_model, data)
        got = np.asarray(answer.json()["embedding"], np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=EMBEDDING_ATOL, err_msg=name)


@pytest.fixture(scope="module")
def official_model() -> nn.Module:
    """facebookresearch/hiera's own model at micro size, with a head that is not ~0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import hiera as official

    torch.manual_seed(5)
    # The default head_init_scale (0.001) leaves every class within 1e-4 of uniform.
    return official.Hiera(num_classes=1000, head_init_scale=1.0, **MICRO_KWARGS).eval()


@pytest.fixture(scope="module")
def official_repository(
    tmp_path_factory: pytest.TempPathFactory, micro_variant: Variant, official_model: nn.Module
) -> Path:
    root = tmp_path_factory.mktemp("official")
    checkpoint = root / "official.pth"
    torch.save({"model_state": official_model.state_dict()}, checkpoint)
    return export_repository(build(micro_variant, checkpoint), root, formats=("onnx",))


async def test_scores_are_the_official_models_probabilities(
    official_repository: Path, official_model: nn.Module, micro_model: BuiltModel
) -> None:
    # The official model applies softmax itself in eval mode: the scores come from its code,
    # on timm's transform of the photo, not from service.postprocess.
    uploads = {name: photos()[name] for name in ("jpeg-512x600", "jpeg-greyscale")}
    async with serving(official_repository) as client:
        answers = [
            await client.post("/v1/classify?top_k=5", content=data, headers={"Content-Type": kind})
            for data, kind in uploads.values()
        ]
    for (name, (data, _)), answer in zip(uploads.items(), answers, strict=True):
        assert answer.status_code == 200, answer.text
        with torch.inference_mode():
            want = official_model(model_input(micro_model, data))[0].double().numpy()
        best = np.argsort(-want, kind="stable")[:5]
        # Apart by more than float noise (measured gaps >= 2e-6), so the order is defined.
        assert (-np.diff(want[best]) > 1e-6).all(), want[best]
        labels = answer.json()["labels"]
        assert [e["index"] for e in labels] == best.tolist(), name
        assert [e["score"] for e in labels] == pytest.approx(want[best].tolist(), rel=1e-4)
