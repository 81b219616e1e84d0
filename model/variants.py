"""The Hiera variant catalogue: what each model needs to be built, fed and described.

Preprocessing, class count and weight licence come from timm's pretrained configs and the
embedding width from the model itself (built on the meta device, so even Hiera-H costs
nothing). Only the paper's headline figures are typed here, because timm does not carry them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class PaperFigures:
    """Headline numbers from Ryali et al., ICML 2023 (Table 11, ImageNet-1K fine-tuned)."""

    params_m: float
    flops_g: float
    top1: float


@dataclass(frozen=True)
class Variant:
    """Everything the exporter and the service need to know about one Hiera model."""

    name: str
    timm_name: str
    pretrained_tag: str
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str
    num_classes: int
    embed_dim: int
    license: str
    label_subset: str | None  # timm ImageNetInfo subset, None where the classes are unnamed
    paper: PaperFigures | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def pretrained_name(self) -> str:
        """Return the timm name with the pretrained tag, as the hub knows it."""
        return f"{self.timm_name}.{self.pretrained_tag}"


# name -> (pretrained tag served by default, paper figures)
_CATALOGUE: dict[str, tuple[str, PaperFigures | None]] = {
    "hiera_tiny_224": ("mae_in1k_ft_in1k", PaperFigures(28, 5, 82.8)),
    "hiera_small_224": ("mae_in1k_ft_in1k", PaperFigures(35, 6, 83.8)),
    "hiera_base_224": ("mae_in1k_ft_in1k", PaperFigures(52, 9, 84.5)),
    "hiera_base_plus_224": ("mae_in1k_ft_in1k", PaperFigures(70, 13, 85.2)),
    "hiera_large_224": ("mae_in1k_ft_in1k", PaperFigures(214, 40, 86.1)),
    "hiera_huge_224": ("mae_in1k_ft_in1k", PaperFigures(673, 125, 86.9)),
    # Not in the paper: timm's ImageNet-12k pretrained, 1k fine-tuned, Apache-2.0 weights.
    "hiera_small_abswin_256": ("sbb2_e200_in12k_ft_in1k", None),
}

_LABEL_SUBSETS = {1000: "imagenet-1k", 11821: "imagenet-12k"}


class UnknownVariant(ValueError):
    """Raised for a variant name that is not in the catalogue."""


def variant_names() -> list[str]:
    """Return the catalogue's variant names in size order."""
    return list(_CATALOGUE)


def get_variant(name: str) -> Variant:
    """Return the catalogue entry for `name` (a timm name, with or without a tag)."""
    base, _, tag = name.partition(".")
    if base not in _CATALOGUE:
        known = ", ".join(_CATALOGUE)
        raise UnknownVariant(f"unknown Hiera variant {name!r}; choose one of: {known}")
    default_tag, paper = _CATALOGUE[base]
    return _describe(base, tag or default_tag, paper)


def custom_variant(base: str, name: str, **model_kwargs: Any) -> Variant:
    """Derive a variant with different architecture kwargs (used for small test models)."""
    parent = get_variant(base)
    # Kwargs read back from a JSON manifest carry lists where timm expects tuples.
    model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    embed_dim, num_classes = _measure(parent.timm_name, tuple(sorted(model_kwargs.items())))
    return replace(
        parent,
        name=name,
        paper=None,
        embed_dim=embed_dim,
        num_classes=num_classes,
        label_subset=_LABEL_SUBSETS.get(num_classes),
        model_kwargs=MappingProxyType(dict(model_kwargs)),
    )


@functools.cache
def _describe(timm_name: str, tag: str, paper: PaperFigures | None) -> Variant:
    import timm  # deferred: importing timm costs seconds and this module is imported at startup

    cfg = timm.models.get_pretrained_cfg(f"{timm_name}.{tag}")
    if cfg is None:
        raise UnknownVariant(f"timm has no pretrained config {timm_name}.{tag}")
    embed_dim, _ = _measure(timm_name, ())
    _, height, width = cfg.input_size
    return Variant(
        name=timm_name,
        timm_name=timm_name,
        pretrained_tag=tag,
        input_size=(height, width),
        mean=tuple(cfg.mean),  # type: ignore[arg-type]
        std=tuple(cfg.std),  # type: ignore[arg-type]
        interpolation=cfg.interpolation,
        crop_pct=float(cfg.crop_pct),
        crop_mode=cfg.crop_mode,
        num_classes=int(cfg.num_classes),
        embed_dim=embed_dim,
        license=cfg.license or "unknown",
        label_subset=_LABEL_SUBSETS.get(int(cfg.num_classes)),
        paper=paper,
    )


@functools.cache
def _measure(timm_name: str, model_kwargs: tuple[tuple[str, Any], ...]) -> tuple[int, int]:
    """Return (embedding width, class count) of the architecture without allocating weights."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, **dict(model_kwargs))
    return int(model.num_features), int(model.num_classes)  # type: ignore[arg-type]
