from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.hiera import MaskUnitAttention

from model.attention import FoldedMaskUnitAttention, fold_mask_units
from model.hiera import build


def _timm_reference(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's own Hiera with the same weights and its 5-D mask-unit attention untouched."""
    reference = timm.create_model(name, pretrained=False).eval()
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("name", ["hiera_tiny_224", "hiera_small_224"])
def test_built_model_matches_timms_unfolded_hiera(name: str) -> None:
    built = build(name, "random", seed=3).module
    reference = _timm_reference(name, built.backbone.state_dict())
    windowed = [m for m in reference.modules() if type(m) is MaskUnitAttention]
    assert any(m.use_mask_unit_attn and m.q_stride > 1 for m in windowed)  # q pooling covered
    images = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        logits, embedding = built(images)
        expected_logits = reference(images)
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=2e-5)


def test_fold_switches_every_attention_layer_and_keeps_the_weights() -> None:
    model = timm.create_model("hiera_tiny_224", pretrained=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [m for m in model.modules() if isinstance(m, MaskUnitAttention)]
    assert any(m.use_mask_unit_attn for m in layers) and not all(
        m.use_mask_unit_attn for m in layers
    )  # both kinds present
    assert fold_mask_units(model) == len(layers)
    assert all(type(m) is FoldedMaskUnitAttention for m in layers)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert fold_mask_units(model) == 0  # already folded


def test_cpu_eager_uses_explicit_attention_and_traces_keep_sdpa(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = build("hiera_tiny_224", "random", seed=2).module
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    images = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        built(images)
    assert not calls  # eager on a CPU: softmax(q k^T) v, faster at these lengths
    layers = sum(1 for m in built.modules() if isinstance(m, FoldedMaskUnitAttention))
    with torch.no_grad():
        torch.jit.trace(built, images, check_trace=False)
    assert len(calls) == layers  # a trace records SDPA, whatever device it was made on


def test_unfused_attention_path_agrees_too() -> None:
    built = build("hiera_tiny_224", "random", seed=1).module
    reference = _timm_reference("hiera_tiny_224", built.backbone.state_dict())
    for model in (built, reference):
        for layer in model.modules():
            if isinstance(layer, MaskUnitAttention):
                layer.fused_attn = False  # the explicit softmax(q k^T) v that some exports use
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        _, embedding = built(images)
        expected = reference.forward_head(reference.forward_features(images), pre_logits=True)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=2e-5)
