from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.hiera import BuiltModel, WeightsSource, WeightsUnavailable, build
from model.variants import Variant


@pytest.mark.parametrize(
    ("name", "size", "embed_dim"),
    [("hiera_tiny_224", 224, 768), ("hiera_small_abswin_256", 256, 768)],
)
def test_real_variants_return_logits_and_embedding(name: str, size: int, embed_dim: int) -> None:
    built = build(name, "random")
    images = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        logits, embedding = built.module(images)
        reference_logits = built.module.backbone(images)  # timm's own forward
    assert logits.shape == (2, 1000) and logits.dtype == torch.float32
    assert embedding.shape == (2, embed_dim) and embedding.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-5)
    # The random head is re-initialised, so logits carry information (timm's is all zeros).
    assert logits.std() > 0.01


def test_embedding_is_timms_pre_logits(micro_model: BuiltModel) -> None:
    backbone = micro_model.module.backbone
    images = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        logits, embedding = micro_model.module(images)
        expected = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=0)
    torch.testing.assert_close(logits, backbone.head.fc(embedding), rtol=0, atol=0)
    assert not micro_model.module.training


def test_random_weights_are_seeded_and_labelled(micro_variant: Variant) -> None:
    a = build(micro_variant, "random", seed=3)
    b = build(micro_variant, "random", seed=3)
    c = build(micro_variant, "random", seed=4)
    assert a.weights.is_random and a.weights.source == "random" and a.weights.seed == 3
    assert a.weights.state_sha256 == b.weights.state_sha256 != c.weights.state_sha256


def test_random_init_leaves_global_rng_alone(micro_variant: Variant) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build(micro_variant, "random", seed=0)
    torch.testing.assert_close(torch.rand(4), expected)


def test_weights_source_parsing(tmp_path: Path) -> None:
    assert WeightsSource.parse("pretrained").kind == "pretrained"
    assert WeightsSource.parse("random").kind == "random"
    parsed = WeightsSource.parse(tmp_path / "w.pth")
    assert parsed.kind == "file" and parsed.path == tmp_path / "w.pth"
    with pytest.raises(ValueError, match="checkpoint path"):
        WeightsSource.parse("  ")


def test_pretrained_without_network_or_cache_explains_the_options(
    micro_variant: Variant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailable, match="local checkpoint path") as info:
        build(micro_variant, "pretrained")
    assert "hiera_tiny_224.mae_in1k_ft_in1k" in str(info.value)


def test_abswin_position_embedding_is_frozen_bit_identically_and_exports_to_onnx(
    tmp_path: Path,
) -> None:
    import timm

    from model.export import export_repository
    from model.hiera import freeze_window_pos_embed
    from model.variants import custom_variant

    built = build(custom_variant("hiera_small_abswin_256", "micro_abswin", embed_dim=16,
                                num_heads=1, stages=(1, 1, 1, 1)), "random", seed=4)  # fmt: skip
    backbone = built.module.backbone
    assert hasattr(backbone, "serving_pos_embed")
    assert "serving_pos_embed" not in backbone.state_dict()  # checkpoints and digests unchanged
    reference = timm.create_model(
        "hiera_small_abswin_256", pretrained=False, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)
    ).eval()
    reference.load_state_dict(backbone.state_dict())
    images = torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        torch.testing.assert_close(
            backbone.forward_features(images), reference.forward_features(images), rtol=0,
            atol=2e-5,
        )  # fmt: skip
    assert not freeze_window_pos_embed(build("hiera_tiny_224", "random").module.backbone)
    # The resize it replaces has no ONNX export at any opset; now the export and its parity pass.
    export_repository(built, tmp_path, formats=("onnx",))
