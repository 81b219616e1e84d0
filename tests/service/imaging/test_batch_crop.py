"""Grouped resize and crop: one call per source size, the same pixels as one image at a time."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode

from service.imaging.batch_crop import crop_batch, crop_one, size_groups
from tests.service.helpers import MICRO_PP

BICUBIC = InterpolationMode.BICUBIC


def photo_like(seed: int, height: int, width: int) -> torch.Tensor:
    """A smooth random uint8 [3, H, W] image (upscaled noise, like make_image)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand((1, 3, 8, 8), generator=generator) * 255
    big = torch.nn.functional.interpolate(small, (height, width), mode="bilinear")
    return big[0].round().to(torch.uint8)


# Sizes that share groups, one that needs no resize (short side already 248), one smaller than
# the crop, and a strip where only the crop window is resampled.
SIZES = [(240, 320), (375, 500), (240, 320), (200, 640), (375, 500), (300, 248), (50, 100)]
SIZES += [(40, 20000), (240, 320)]


def test_grouped_crops_equal_one_image_at_a_time_on_mixed_sizes() -> None:
    images = [photo_like(seed, h, w) for seed, (h, w) in enumerate(SIZES)]
    grouped = crop_batch(images, MICRO_PP, BICUBIC)

    for size, image, crop in zip(SIZES, images, grouped, strict=True):
        assert isinstance(crop, torch.Tensor), size
        assert crop.shape == (3, 224, 224) and crop.dtype == torch.uint8
        assert torch.equal(crop, crop_one(image, MICRO_PP, BICUBIC)), size


def test_images_of_one_size_are_resized_together() -> None:
    images = [photo_like(seed, h, w) for seed, (h, w) in enumerate(SIZES)]

    # Built from SIZES by eye: equal (height, width) share a call, every other size is alone.
    assert size_groups(images, MICRO_PP) == [[0, 2, 8], [1, 4], [3], [5], [6], [7]]


def test_the_crop_is_the_center_of_the_short_side_resize() -> None:
    # A 248 x 300 image needs no resize: its crop is the middle 224 x 224, built here by hand.
    image = photo_like(1, 300, 248)
    (crop,) = crop_batch([image], MICRO_PP, BICUBIC)

    assert crop is not None and torch.equal(crop, image[:, 38:262, 12:236])


def test_an_image_that_is_not_uint8_rgb_fails_alone() -> None:
    good = [photo_like(seed, 240, 320) for seed in range(3)]
    four_channels = torch.zeros((4, 240, 320), dtype=torch.uint8)
    floats = good[0].float()
    crops = crop_batch([good[0], four_channels, good[1], None, floats, good[2]], MICRO_PP, BICUBIC)

    assert [crop is None for crop in crops] == [False, True, False, True, True, False]
    for image, crop in zip(good, (crops[0], crops[2], crops[5]), strict=True):
        assert crop is not None and torch.equal(crop, crop_one(image, MICRO_PP, BICUBIC))
