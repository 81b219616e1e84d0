"""Resize and center-crop decoded images on their device, one resize call per source size.

A batch of uploads often shares a few sizes (phone cameras, thumbnails). Images whose source
window (after `crop_window`) and resize target are equal are stacked into one `[N, 3, h, w]`
tensor and resized with one call, which on a GPU is one kernel launch instead of N. Each image is
resampled independently inside that call, so the result equals resizing it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.imaging.preprocessing import Preprocessing, crop_window, resized_size

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import InterpolationMode

# (source height, width, resize height, width): images with equal keys resize in one call.
GroupKey = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Plan:
    source: torch.Tensor  # [3, h, w]: the whole image, or the window that lands in the crop
    resize_to: tuple[int, int] | None  # (height, width); None = already that size

    @property
    def key(self) -> GroupKey:
        height, width = self.source.shape[-2:]
        return (height, width, *(self.resize_to or (height, width)))


def crop_batch(
    images: Sequence[torch.Tensor | None], pp: Preprocessing, interpolation: InterpolationMode
) -> list[torch.Tensor | None]:
    """Crop every uint8 [3, H, W] image to the model input; None where it cannot be cropped.

    None in, an image that is not uint8 [3, H, W], or one too big for the device's memory:
    None out, so the caller can send that upload to Pillow while the rest of the batch goes on.
    """
    import torch

    crops: list[torch.Tensor | None] = [None] * len(images)
    for members in _grouped_plans(images, pp):
        group = [plan for _, plan in members]
        results: Sequence[torch.Tensor | None]
        try:
            results = _resize_and_crop(group, pp, interpolation)
        except torch.OutOfMemoryError:  # a large group: one by one, so only the too-big fail
            results = [_one_or_none(plan, pp, interpolation) for plan in group]
        for (index, _), crop in zip(members, results, strict=True):
            crops[index] = crop
    return crops


def size_groups(images: Sequence[torch.Tensor | None], pp: Preprocessing) -> list[list[int]]:
    """Return the indices of the images that `crop_batch` resizes together, one list per call."""
    return [[index for index, _ in members] for members in _grouped_plans(images, pp)]


def crop_one(
    image: torch.Tensor, pp: Preprocessing, interpolation: InterpolationMode
) -> torch.Tensor:
    """Resize and center-crop one uint8 [3, H, W] image, with timm's eval geometry."""
    from torchvision.transforms.v2 import functional as tvf

    crop_h, crop_w = pp.input_size
    height, width = image.shape[-2:]
    new_w, new_h = resized_size(width, height, pp)
    box = crop_window(width, height, pp)
    if box is not None:  # resample only the source window that lands in the crop
        return tvf.resize(_window(image, box), [crop_h, crop_w], interpolation, antialias=True)
    if (new_w, new_h) != (width, height):
        image = tvf.resize(image, [new_h, new_w], interpolation, antialias=True)
    return tvf.center_crop(image, [crop_h, crop_w]).contiguous()


def _grouped_plans(
    images: Sequence[torch.Tensor | None], pp: Preprocessing
) -> list[list[tuple[int, _Plan]]]:
    """Plan every croppable image and group the plans by source and target size."""
    groups: dict[GroupKey, list[tuple[int, _Plan]]] = {}
    for index, image in enumerate(images):
        plan = _plan(image, pp)
        if plan is not None:
            groups.setdefault(plan.key, []).append((index, plan))
    return list(groups.values())


def _plan(image: torch.Tensor | None, pp: Preprocessing) -> _Plan | None:
    """Say what to resample and to which size; None for what is not a uint8 [3, H, W] image."""
    import torch

    if image is None or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        return None
    height, width = image.shape[-2:]
    if min(height, width) < 1:
        return None
    box = crop_window(width, height, pp)
    if box is not None:
        return _Plan(_window(image, box), pp.input_size)
    new_w, new_h = resized_size(width, height, pp)
    return _Plan(image, None if (new_w, new_h) == (width, height) else (new_h, new_w))


def _resize_and_crop(
    group: Sequence[_Plan], pp: Preprocessing, interpolation: InterpolationMode
) -> Sequence[torch.Tensor]:
    """Resize a group of equal-sized sources with one call and center-crop them together."""
    import torch
    from torchvision.transforms.v2 import functional as tvf

    stacked = torch.stack([plan.source for plan in group])  # [N, 3, h, w]
    resize_to = group[0].resize_to
    if resize_to is not None:
        stacked = tvf.resize(stacked, list(resize_to), interpolation, antialias=True)
    cropped = tvf.center_crop(stacked, list(pp.input_size)).contiguous()
    return cropped.unbind(0)


def _one_or_none(
    plan: _Plan, pp: Preprocessing, interpolation: InterpolationMode
) -> torch.Tensor | None:
    import torch

    try:
        return _resize_and_crop([plan], pp, interpolation)[0]
    except torch.OutOfMemoryError:
        return None


def _window(image: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """Slice the source pixels of `box` (left, top, right, bottom), at least one pixel."""
    left, top, right, bottom = box
    rows, cols = max(1, round(bottom - top)), max(1, round(right - left))
    return image[:, round(top) : round(top) + rows, round(left) : round(left) + cols]
