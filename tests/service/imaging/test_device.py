"""The tensor (device) decoder, run on CPU tensors: the same code nvJPEG runs on a GPU.

Every test runs with both JPEG decoders: torchvision, and nvImageCodec's code path with a fake
module that decodes with Pillow (tests/service/imaging/fake_nvimgcodec.py).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from bench.photos import jpeg_set
from model.hiera import BuiltModel
from service.imaging import CorruptImage, cpu
from service.imaging.device import TensorDecoder
from service.runtime.feed import normalize
from tests.service.helpers import MICRO_PP, make_image
from tests.service.imaging.fake_nvimgcodec import FakeNvImageCodec

MAX_PIXELS = 10**8


@pytest.fixture(scope="module", params=["torchvision", "nvimgcodec"])
def decoder(request: pytest.FixtureRequest) -> Iterator[TensorDecoder]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "nvidia.nvimgcodec", FakeNvImageCodec())
        made = TensorDecoder(MICRO_PP, "cpu", max_pixels=MAX_PIXELS, decoder=request.param)
        assert made.decoder_name == request.param
        yield made


def exact_crop(data: bytes) -> np.ndarray:
    """The exact Pillow path's crop, uint8 [3, H, W]."""
    return cpu.crop(cpu.decode_image(data, max_pixels=MAX_PIXELS).image, MICRO_PP)


def reference_crop(data: bytes) -> np.ndarray:
    """timm's eval transform on a full Pillow decode (no draft), as uint8 [3, H, W]."""
    from timm.data import create_transform

    transform = create_transform(
        input_size=(3, 224, 224),
        interpolation=MICRO_PP.interpolation,
        crop_pct=MICRO_PP.crop_pct,
        mean=(0.0, 0.0, 0.0),
        std=(1.0 / 255, 1.0 / 255, 1.0 / 255),
    )
    with Image.open(io.BytesIO(data)) as image:
        from PIL import ImageOps

        upright = ImageOps.exif_transpose(image).convert("RGB")
    return np.rint(transform(upright).numpy()).clip(0, 255).astype(np.uint8)


def test_crops_have_the_model_input_shape_and_dtype(decoder: TensorDecoder) -> None:
    batch = decoder.decode_batch([make_image(1), make_image(2, (640, 200))])

    assert [tuple(c.shape) for c in batch.crops] == [(3, 224, 224)] * 2  # type: ignore[union-attr]
    assert all(c.dtype == torch.uint8 for c in batch.crops)  # type: ignore[union-attr]
    assert batch.cpu_fallbacks == 0


def test_crops_agree_with_timms_transform_and_the_pillow_path_on_real_photos(
    decoder: TensorDecoder,
) -> None:
    photos = jpeg_set()
    crops = decoder.decode_batch(list(photos.values())).crops
    worst, from_pillow = {}, {}
    for (name, data), crop in zip(photos.items(), crops, strict=True):
        assert isinstance(crop, torch.Tensor), name
        got = crop.numpy().astype(np.int16)
        worst[name] = float(np.abs(got - reference_crop(data).astype(np.int16)).mean())
        diff = np.abs(got - exact_crop(data).astype(np.int16))
        from_pillow[name] = (float(diff.mean()), int(diff.max()))
    # Different JPEG IDCTs and bicubic kernels: a few 8-bit levels on average, never a
    # different window (a shifted or rotated crop differs by tens of levels).
    assert max(worst.values()) < 3.0, worst
    # On the CPU both decoders are libjpeg-turbo with fancy upsampling, like Pillow: only the
    # bicubic kernels differ (torch's and Pillow's), by at most 2 levels, 0.12 on average.
    assert max(mean for mean, _ in from_pillow.values()) < 0.25, from_pillow
    assert max(peak for _, peak in from_pillow.values()) <= 2, from_pillow


def test_model_outputs_agree_with_the_cpu_path_on_real_photos(
    decoder: TensorDecoder, micro_model: BuiltModel
) -> None:
    photos = jpeg_set()
    device_crops = decoder.decode_batch(list(photos.values())).crops
    cpu_crops = [exact_crop(d) for d in photos.values()]

    def run(crops: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(normalize(np.stack(crops), MICRO_PP.mean, MICRO_PP.std))
        with torch.inference_mode():
            return micro_model.module(batch)

    logits_d, emb_d = run([c.numpy() for c in device_crops])  # type: ignore[union-attr]
    logits_c, emb_c = run(cpu_crops)
    cosine = torch.nn.functional.cosine_similarity(emb_d, emb_c)
    same_top5 = (logits_d.topk(5).indices == logits_c.topk(5).indices).all(dim=1)

    assert float(cosine.min()) >= 0.999, dict(zip(photos, cosine.tolist(), strict=True))
    assert float(same_top5.float().mean()) >= 0.99


def test_exif_orientation_is_applied(decoder: TensorDecoder) -> None:
    photos = jpeg_set()
    upright = decoder.decode_batch([photos["grace_hopper-1024x1200"]]).crops[0]
    rotated = decoder.decode_batch([photos["grace_hopper-exif-rotated"]]).crops[0]
    assert isinstance(upright, torch.Tensor) and isinstance(rotated, torch.Tensor)

    diff = (upright.int() - rotated.int()).abs().float().mean()
    assert float(diff) < 3.0  # the same picture, upright, after re-encoding


def test_a_corrupt_jpeg_fails_alone_and_the_batch_survives(decoder: TensorDecoder) -> None:
    good = make_image(3)
    broken = good[:200] + b"\x00" * 50  # a JPEG header with nothing decodable behind it
    result = decoder.decode_batch([good, broken, make_image(4)])

    assert isinstance(result.crops[0], torch.Tensor)
    assert isinstance(result.crops[1], CorruptImage)
    assert isinstance(result.crops[2], torch.Tensor)
    assert result.cpu_fallbacks == 1


def test_extreme_aspect_ratio_resamples_only_the_crop_window(decoder: TensorDecoder) -> None:
    strip = make_image(5, (20000, 40))  # resized it would be 124,000 x 248 pixels
    crop = decoder.decode_batch([strip]).crops[0]

    assert isinstance(crop, torch.Tensor)
    assert tuple(crop.shape) == (3, 224, 224)
