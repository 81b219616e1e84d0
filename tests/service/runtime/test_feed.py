"""Feeders: queued crops in, one normalised batch out, exactly as timm would have fed it."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import functional as tvf

from service.runtime.feed import Feeder, normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE = (3, 8, 6)


def crops(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, SHAPE, dtype=np.uint8) for _ in range(count)]


def torchvision_reference(crop: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize, independent of the code under test."""
    tensor = tvf.to_tensor(np.ascontiguousarray(crop.transpose(1, 2, 0)))
    return tvf.normalize(tensor, MEAN, STD).numpy()


def cpu_feeder(input_dtype: str = "float32") -> Feeder:
    return Feeder(
        device="cpu", input_dtype=input_dtype, mean=MEAN, std=STD, input_shape=SHAPE,
        max_batch_size=4,
    )  # fmt: skip


def test_uint8_crops_are_normalised_bit_identically_to_torchvision() -> None:
    items = crops(3)
    batch = cpu_feeder()(items)

    assert batch.dtype == np.float32 and batch.shape == (3, *SHAPE)
    for row, crop in zip(batch, items, strict=True):
        np.testing.assert_array_equal(row, torchvision_reference(crop))


def test_normalize_keeps_channel_statistics_per_channel() -> None:
    flat = np.stack([np.full(SHAPE[1:], value, np.uint8) for value in (0, 128, 255)])
    out = normalize(flat, MEAN, STD)
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), MEAN, STD, strict=True)]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)


def test_already_normalised_float_items_pass_through_in_order() -> None:
    pixels = crops(2, seed=1)
    ready = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    batch = cpu_feeder()([pixels[0], ready, pixels[1]])

    np.testing.assert_array_equal(batch[0], torchvision_reference(pixels[0]))
    np.testing.assert_array_equal(batch[1], ready)
    np.testing.assert_array_equal(batch[2], torchvision_reference(pixels[1]))


def test_cpu_torch_tensors_from_the_tensor_decoder_are_accepted() -> None:
    (crop,) = crops(1, seed=3)
    batch = cpu_feeder()([torch.from_numpy(crop)])
    np.testing.assert_array_equal(batch[0], torchvision_reference(crop))


def test_a_half_precision_session_is_fed_float16() -> None:
    items = crops(2, seed=4)
    batch = cpu_feeder("float16")(items)

    assert batch.dtype == np.float16
    np.testing.assert_array_equal(batch, cpu_feeder()(items).astype(np.float16))
