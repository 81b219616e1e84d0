"""The served device-decode path, with the tensor decoder on CPU tensors (as CI runs it)."""

from __future__ import annotations

import asyncio
import base64
import functools
import sys
from pathlib import Path

import numpy as np
import pytest

import service.app as app_module
from bench.photos import jpeg_set
from model.hiera import BuiltModel
from service.app import create_app
from service.inference import InferenceService
from tests.service.helpers import make_image, repository_settings, running
from tests.service.imaging.fake_nvimgcodec import FakeNvImageCodec
from tests.service.reference import reference


@pytest.fixture
def tensor_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve with the tensor decoder on the CPU: what --decode-device cuda runs on a GPU."""
    monkeypatch.setattr(app_module, "InferenceService", functools.partial(
        InferenceService, decode_on="cpu"))  # fmt: skip


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.usefixtures("tensor_decoding")
async def test_jpegs_are_decoded_by_the_tensor_decoder_and_agree_with_timm(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    app = create_app(repository_settings(micro_repository))
    photos = jpeg_set()
    names = ["grace_hopper-as-is", "astronaut-500x375", "grace_hopper-exif-rotated"]
    async with running(app) as client:
        replies = [
            await client.post(
                "/v1/embed?normalize=false",
                content=photos[name],
                headers={"Content-Type": "image/jpeg"},
            )
            for name in names
        ]
        models = (await client.get("/v1/models")).json()["models"][0]
    device_decoder = app.state.service._device_decoder

    assert [r.status_code for r in replies] == [200, 200, 200]
    assert device_decoder is not None and device_decoder.batches == 3
    assert models["decode_device"] == "cpu" and models["providers"] == ["CPUExecutionProvider"]
    for name, reply in zip(names, replies, strict=True):
        got = np.asarray(reply.json()["embedding"], np.float32)
        assert cosine(got, reference(micro_model, photos[name])[1]) >= 0.999, name


@pytest.mark.usefixtures("tensor_decoding")
@pytest.mark.parametrize(
    ("wanted", "runs"),
    [("auto", "nvimgcodec"), ("nvimgcodec", "nvimgcodec"), ("torchvision", "torchvision")],
)
async def test_models_says_which_jpeg_decoder_runs(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch, wanted: str, runs: str
) -> None:
    fake = FakeNvImageCodec()
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", fake)
    app = create_app(repository_settings(micro_repository, device_decoder=wanted))
    async with running(app) as client:
        reply = await client.post(
            "/v1/embed", content=make_image(1), headers={"Content-Type": "image/jpeg"}
        )
        models = (await client.get("/v1/models")).json()["models"][0]

    assert reply.status_code == 200
    assert models["device_decoder"] == runs
    assert [d.batches for d in fake.decoders] == ([[1]] if runs == "nvimgcodec" else [])


async def test_models_names_no_jpeg_decoder_when_jpegs_decode_with_pillow(
    micro_repository: Path,
) -> None:
    async with running(create_app(repository_settings(micro_repository))) as client:
        models = (await client.get("/v1/models")).json()["models"][0]

    assert models["decode_device"] == "cpu" and models["device_decoder"] is None


@pytest.mark.usefixtures("tensor_decoding")
async def test_concurrent_jpegs_are_decoded_in_batches(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, max_batch_size=4))
    async with running(app) as client:
        replies = await asyncio.gather(
            *(
                client.post(
                    "/v1/embed", content=make_image(seed), headers={"Content-Type": "image/jpeg"}
                )
                for seed in range(12)
            )
        )
    decoder = app.state.service._device_decoder

    assert [r.status_code for r in replies] == [200] * 12
    assert decoder.batches < 12  # several uploads shared a decode batch


@pytest.mark.usefixtures("tensor_decoding")
async def test_other_formats_and_bad_jpegs_take_the_cpu_checks(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository))
    async with running(app) as client:
        png = await client.post(
            "/v1/embed?encoding=base64",
            content=make_image(1, fmt="PNG"),
            headers={"Content-Type": "image/png"},
        )
        jpeg = make_image(2)
        broken_header, broken_data = jpeg[:300], jpeg[: len(jpeg) // 2]
        replies = [
            await client.post("/v1/classify", content=body, headers={"Content-Type": "image/jpeg"})
            for body in (broken_header, broken_data, jpeg)
        ]
    decoder = app.state.service._device_decoder

    assert png.status_code == 200
    assert len(base64.b64decode(png.json()["embedding"])) == 128 * 4
    assert [r.status_code for r in replies] == [400, 400, 200]
    codes = [r.json()["error"]["code"] for r in replies[:2]]
    assert codes == ["corrupt_image", "truncated_image"]
    # Only the good JPEG reached the device decoder: the PNG decodes on the CPU, the broken
    # header fails the header check, and the JPEG cut in half (no end-of-image marker) is
    # refused before the device decoder could accept it silently.
    assert (decoder.batches, decoder.fallbacks) == (1, 0)


@pytest.mark.usefixtures("tensor_decoding")
async def test_pixel_budget_is_checked_on_the_header_before_any_device_decode(
    micro_repository: Path,
) -> None:
    app = create_app(repository_settings(micro_repository, max_image_pixels=100 * 100))
    async with running(app) as client:
        reply = await client.post(
            "/v1/embed", content=make_image(4, (320, 240)), headers={"Content-Type": "image/jpeg"}
        )
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "image_too_large"
    assert app.state.service._device_decoder.batches == 0


async def test_decode_device_cuda_needs_the_model_on_a_gpu(micro_repository: Path) -> None:
    with pytest.raises(ValueError, match="--decode-device cuda"):
        repository_settings(micro_repository, decode_device="cuda")
