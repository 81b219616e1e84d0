from __future__ import annotations

import pytest
import timm

from model.variants import UnknownVariant, custom_variant, get_variant, variant_names

EXPECTED_EMBED_DIMS = {
    "hiera_tiny_224": 768,
    "hiera_small_224": 768,
    "hiera_base_224": 768,
    "hiera_base_plus_224": 896,
    "hiera_large_224": 1152,
    "hiera_huge_224": 2048,
    "hiera_small_abswin_256": 768,
}


def test_catalogue_covers_all_image_variants() -> None:
    assert variant_names() == list(EXPECTED_EMBED_DIMS)


@pytest.mark.parametrize("name", list(EXPECTED_EMBED_DIMS))
def test_variant_matches_timm_pretrained_config(name: str) -> None:
    variant = get_variant(name)
    cfg = timm.models.get_pretrained_cfg(variant.pretrained_name)
    assert cfg is not None
    assert (3, *variant.input_size) == tuple(cfg.input_size)
    assert variant.mean == tuple(cfg.mean)
    assert variant.std == tuple(cfg.std)
    assert variant.interpolation == cfg.interpolation == "bicubic"
    assert variant.crop_pct == cfg.crop_pct
    assert variant.num_classes == cfg.num_classes == 1000
    assert variant.license == cfg.license
    assert variant.embed_dim == EXPECTED_EMBED_DIMS[name]
    assert variant.label_subset == "imagenet-1k"


def test_licences_and_paper_figures() -> None:
    assert get_variant("hiera_small_abswin_256").license == "apache-2.0"
    assert get_variant("hiera_small_abswin_256").input_size == (256, 256)
    assert get_variant("hiera_base_224").license == "cc-by-nc-4.0"
    tiny = get_variant("hiera_tiny_224").paper
    huge = get_variant("hiera_huge_224").paper
    assert tiny is not None and tiny.top1 == 82.8
    assert huge is not None and huge.top1 == 86.9


def test_tagged_name_selects_other_pretrained_config() -> None:
    variant = get_variant("hiera_small_abswin_256.sbb2_pd_e200_in12k")
    assert variant.num_classes == 11821
    assert variant.label_subset == "imagenet-12k"


def test_unknown_variant_names_the_choices() -> None:
    with pytest.raises(UnknownVariant, match="hiera_tiny_224"):
        get_variant("hiera_gigantic_224")


def test_custom_variant_measures_its_embedding_width() -> None:
    variant = custom_variant("hiera_tiny_224", "micro", embed_dim=16, stages=(1, 1, 1, 1))
    assert variant.embed_dim == 128  # 16 doubled at each of three stage transitions
    assert variant.paper is None
    assert dict(variant.model_kwargs) == {"embed_dim": 16, "stages": (1, 1, 1, 1)}
