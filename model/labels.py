"""Class names for a variant's classifier, taken offline from the copy timm ships."""

from __future__ import annotations

from model.variants import Variant


def class_names(variant: Variant) -> tuple[list[str], list[str] | None]:
    """Return (human-readable names, synset ids) for every class index of `variant`."""
    if variant.label_subset is None:
        # A custom head with unnamed classes: index-based names keep responses well-formed.
        return [f"class_{i}" for i in range(variant.num_classes)], None
    from timm.data import ImageNetInfo

    info = ImageNetInfo(variant.label_subset)
    if info.num_classes() != variant.num_classes:
        raise ValueError(
            f"{variant.label_subset} has {info.num_classes()} classes but {variant.name} "
            f"predicts {variant.num_classes}"
        )
    ids = [info.index_to_label_name(i) for i in range(variant.num_classes)]
    names = [info.index_to_description(i) for i in range(variant.num_classes)]
    return names, ids
