"""Serving the int8 artifact, and exact vs reduced-scale JPEG decode, through the API."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import agreement
from model.artifacts import MANIFEST_FILE, ModelRepository, RepositoryError
from model.export import export_repository
from model.hiera import BuiltModel
from service.app import create_app
from service.runtime import loader
from service.runtime.base import BackendError
from service.runtime.loader import plan
from service.settings import Settings
from tests.service.helpers import (
    make_image,
    repository_settings,
    running,
    serving,
)
from tests.service.reference import (
    EMBEDDING_ATOL,
    model_input,
    reference,
    timm_outputs,
    transform,
)


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory: pytest.TempPathFactory, micro_model: BuiltModel) -> Path:
    root = tmp_path_factory.mktemp("int8_repository")
    return export_repository(micro_model, root, formats=("onnx_int8",))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a64 @ b64 / np.linalg.norm(a64) / np.linalg.norm(b64))


async def test_int8_serves_the_quantized_artifact_and_shows_its_agreement(
    int8_repository: Path, micro_model: BuiltModel
) -> None:
    data = make_image(5)
    _, want = reference(micro_model, data)
    async with serving(int8_repository, precision="int8") as client:
        response = await client.post(
            "/v1/embed?normalize=false", content=data, headers={"Content-Type": "image/jpeg"}
        )
        models = (await client.get("/v1/models")).json()["models"][0]
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["embedding"])
    assert _cosine(got, want) >= 0.999
    assert np.abs(got - want).max() > 1e-4  # not the fp32 graph: int8 moves every value a bit
    manifest = ModelRepository.load(int8_repository).manifest
    assert models["precision"] == "int8" and models["artifact"] == "model.int8.onnx"
    assert models["agreement"] == manifest.artifacts["onnx_int8"].agreement.model_dump()  # type: ignore[union-attr]


async def test_fp32_reports_its_artifact_and_no_agreement(int8_repository: Path) -> None:
    async with serving(int8_repository) as client:
        models = (await client.get("/v1/models")).json()["models"][0]
    assert models["precision"] == "fp32" and models["artifact"] == "model.onnx"
    assert models["agreement"] is None


@pytest.mark.parametrize("backend", ["torchscript", "eager"])
async def test_bf16_shows_the_agreement_recorded_for_its_backend(
    micro_repository: Path, micro_model: BuiltModel, backend: str
) -> None:
    data = make_image(6)
    _, want = reference(micro_model, data)
    async with serving(micro_repository, backend=backend, precision="bf16") as client:
        response = await client.post(
            "/v1/embed?normalize=false", content=data, headers={"Content-Type": "image/jpeg"}
        )
        models = (await client.get("/v1/models")).json()["models"][0]
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["embedding"])
    assert 0.99 <= _cosine(got, want) < 1.0  # bf16: close to fp32, not equal
    recorded = ModelRepository.load(micro_repository).manifest.autocast[f"{backend}:bf16"]
    assert models["precision"] == "bf16"
    assert models["agreement"] == recorded.model_dump()


def test_bf16_without_a_repository_is_measured_at_load(
    micro_model: BuiltModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "build", lambda *_args, **_kwargs: micro_model)  # not tiny
    settings = Settings(weights="random", backend="eager", device="cpu", precision="bf16")
    card = plan(settings).card
    assert card.agreement is not None
    assert card.agreement["photos"] == 8 and card.agreement["source"].startswith("packaged")
    assert card.agreement["passed"] and card.agreement["embedding_min_cosine"] < 1.0


def test_bf16_under_the_bound_refuses_to_serve(
    micro_model: BuiltModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agreement, "MIN_COSINE", 1.01)
    target = export_repository(micro_model, tmp_path, formats=("onnx",))
    settings = Settings(model_repository=target, backend="eager", device="cpu", precision="bf16")
    with pytest.raises(BackendError, match=r"eager:bf16 .* refusing to serve it"):
        plan(settings)
    # fp32 from the same repository still serves.
    assert plan(settings.model_copy(update={"precision": "fp32"})).card.agreement is None


def test_bf16_from_a_repository_without_figures_asks_for_a_re_export(
    micro_model: BuiltModel, tmp_path: Path
) -> None:
    target = export_repository(micro_model, tmp_path, formats=("onnx",))
    raw = ModelRepository.load(target).manifest.model_dump(mode="json")
    del raw["autocast"]  # as a format-2 export from before bf16 was measured
    (target / MANIFEST_FILE).write_text(json.dumps(raw))
    settings = Settings(model_repository=target, backend="eager", device="cpu", precision="bf16")
    with pytest.raises(RepositoryError, match=r"records no eager:bf16 agreement.*re-export"):
        plan(settings)


def _noisy_jpeg(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("draft", [False, True])
async def test_jpeg_decode_is_exact_unless_draft_is_set(
    micro_repository: Path, micro_model: BuiltModel, draft: bool
) -> None:
    data = _noisy_jpeg(1600, 1200)  # 1/4-scale draftable for a 248 px resize
    exact = model_input(micro_model, data)
    with Image.open(io.BytesIO(data)) as image:
        # libjpeg's DCT scaling, down to the smallest size >= timm's 248 px resize target.
        image.draft("RGB", (248, 248))
        assert image.size == (400, 300)
        drafted = transform(micro_model, image.convert("RGB"))
    assert (exact - drafted).abs().mean() > 0.05  # the two paths really differ on this image
    _, want = timm_outputs(micro_model, drafted if draft else exact)
    async with serving(micro_repository, jpeg_draft=draft) as client:
        response = await client.post(
            "/v1/embed?normalize=false", content=data, headers={"Content-Type": "image/jpeg"}
        )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["embedding"], want, rtol=0, atol=EMBEDDING_ATOL)


async def test_warm_up_times_batch_sizes_and_caps_batches(micro_repository: Path) -> None:
    settings = repository_settings(micro_repository, batch_cap_from_warmup=True, max_batch_size=4)
    app = create_app(settings)
    async with running(app) as client:
        batching = (await client.get("/v1/models")).json()["models"][0]["batching"]
        timed = dict(app.state.service.pool.per_image_seconds)
    assert sorted(timed) == [1, 2, 4] and all(t > 0 for t in timed.values())
    best = min(timed.values())
    assert batching["batch_cap"] == min(s for s, t in timed.items() if t <= best * 1.05)
    # What is admitted at once follows the cap: queue + one capped batch per instance.
    assert batching["capacity"] == settings.max_queue_size + batching["batch_cap"]
    assert batching["ms_per_image_by_batch_size"] == {
        str(s): round(1e3 * t, 3) for s, t in timed.items()
    }
