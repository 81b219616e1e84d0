"""Which JPEG decoder runs, and what the tensor decoder sends to Pillow (fake nvImageCodec)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bench.photos import encode, jpeg_set
from service.imaging import CorruptImage, ImageError, cpu
from service.imaging.device import TensorDecoder
from service.imaging.jpeg_decoders import device_can_decode
from tests.service.helpers import MICRO_PP, make_image
from tests.service.imaging.fake_nvimgcodec import Backend, BackendKind, FakeNvImageCodec

MAX_PIXELS = 10**8


@pytest.fixture
def nvimgcodec(monkeypatch: pytest.MonkeyPatch) -> FakeNvImageCodec:
    fake = FakeNvImageCodec()
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", fake)
    return fake


def tensor_decoder(decoder: str = "auto") -> TensorDecoder:
    return TensorDecoder(MICRO_PP, "cpu", max_pixels=MAX_PIXELS, decoder=decoder)  # type: ignore[arg-type]


def exact_crop(data: bytes) -> np.ndarray:
    return cpu.crop(cpu.decode_image(data, max_pixels=MAX_PIXELS).image, MICRO_PP)


def is_progressive(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return bool(image.info.get("progressive"))


def test_auto_picks_nvimgcodec_with_fancy_upsampling_when_it_is_installed(
    nvimgcodec: FakeNvImageCodec,
) -> None:
    assert tensor_decoder().decoder_name == "nvimgcodec"

    (made,) = nvimgcodec.decoders
    assert made.options == ":fancy_upsampling=1"  # the library's Python default is 0
    assert made.backends == [Backend(BackendKind.CPU_ONLY)]  # a "cpu" device: no GPU backends


def test_auto_falls_back_to_torchvision_without_nvimgcodec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import raises ImportError

    assert tensor_decoder().decoder_name == "torchvision"


def test_asking_for_nvimgcodec_without_it_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)

    with pytest.raises(RuntimeError, match=r"pip install -c constraints-gpu.txt '\.\[gpu\]'"):
        tensor_decoder("nvimgcodec")


def test_torchvision_can_be_chosen_when_nvimgcodec_is_installed(
    nvimgcodec: FakeNvImageCodec,
) -> None:
    assert tensor_decoder("torchvision").decoder_name == "torchvision"
    assert nvimgcodec.decoders == []


def test_images_nvimgcodec_refuses_go_to_pillow_and_the_rest_decode_in_one_call(
    nvimgcodec: FakeNvImageCodec,
) -> None:
    nvimgcodec.refuse = is_progressive
    photos = jpeg_set()
    uploads = [photos["astronaut-500x375"], photos["astronaut-progressive"], make_image(1)]
    result = tensor_decoder().decode_batch(uploads)

    assert nvimgcodec.decoders[0].batches == [3]  # one decode call for the whole batch
    assert result.cpu_fallbacks == 1
    assert isinstance(result.crops[1], torch.Tensor)
    np.testing.assert_array_equal(result.crops[1].numpy(), exact_crop(uploads[1]))
    for index in (0, 2):  # decoded on the "device", then resized by torch: close, not equal
        crop = result.crops[index]
        assert isinstance(crop, torch.Tensor)
        assert np.abs(crop.numpy().astype(int) - exact_crop(uploads[index])).max() <= 2


def test_a_corrupt_jpeg_fails_alone_with_the_cpu_paths_error(
    nvimgcodec: FakeNvImageCodec,
) -> None:
    good = make_image(3)
    broken = good[:200] + b"\x00" * 50  # a JPEG header with nothing decodable behind it
    result = tensor_decoder().decode_batch([good, broken, make_image(4)])

    with pytest.raises(ImageError) as on_cpu:
        cpu.decode_image(broken, max_pixels=MAX_PIXELS)
    failed = result.crops[1]
    assert isinstance(failed, CorruptImage) and type(failed) is type(on_cpu.value)
    assert str(failed) == str(on_cpu.value)
    assert all(isinstance(result.crops[i], torch.Tensor) for i in (0, 2))


def test_exif_orientation_is_asked_of_nvimgcodec(nvimgcodec: FakeNvImageCodec) -> None:
    photos = jpeg_set()
    uploads = [photos["grace_hopper-1024x1200"], photos["grace_hopper-exif-rotated"]]
    upright, rotated = tensor_decoder().decode_batch(uploads).crops
    assert isinstance(upright, torch.Tensor) and isinstance(rotated, torch.Tensor)
    sideways = torch.from_numpy(exact_crop(photos["grace_hopper-1024x1200"])).rot90(1, (1, 2))

    assert float((upright.int() - rotated.int()).abs().float().mean()) < 3.0
    assert float((sideways.int() - rotated.int()).abs().float().mean()) > 20.0


def test_cmyk_and_arithmetic_coded_jpegs_never_reach_the_device_decoder(
    nvimgcodec: FakeNvImageCodec,
) -> None:
    photo = Image.fromarray(np.asarray(Image.open(io.BytesIO(make_image(5)))))
    cmyk = encode(photo.convert("CMYK"))
    result = tensor_decoder().decode_batch([make_image(6), cmyk])

    assert nvimgcodec.decoders[0].batches == [1]
    assert result.cpu_fallbacks == 1
    np.testing.assert_array_equal(result.crops[1].numpy(), exact_crop(cmyk))  # type: ignore[union-attr]


def test_frame_headers_the_device_decoders_take() -> None:
    photos = jpeg_set()
    baseline, progressive = photos["astronaut-500x375"], photos["astronaut-progressive"]
    sof0 = baseline.index(b"\xff\xc0")
    arithmetic = baseline[: sof0 + 1] + b"\xc9" + baseline[sof0 + 2 :]  # SOF9
    grey = photos["grace_hopper-greyscale"]
    cmyk = encode(Image.new("CMYK", (16, 16)))

    assert [device_can_decode(d) for d in (baseline, progressive, grey)] == [True] * 3
    assert [device_can_decode(d) for d in (arithmetic, cmyk)] == [False, False]
    assert not device_can_decode(b"\x89PNG\r\n\x1a\n") and not device_can_decode(b"\xff\xd8")
