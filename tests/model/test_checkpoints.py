from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoints import CheckpointError, detect_format, read_state_dict
from model.hiera import BuiltModel, build
from model.variants import Variant
from tests.conftest import MICRO_KWARGS


def _trained_like(micro_variant: Variant) -> BuiltModel:
    """A model whose weights differ from the seed-0 random init the tests compare against."""
    return build(micro_variant, "random", seed=7)


def _outputs(built: BuiltModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return built.module(images)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "ddp"])
def test_timm_checkpoint_round_trip(micro_variant: Variant, tmp_path: Path, layout: str) -> None:
    source = _trained_like(micro_variant)
    state = source.module.backbone.state_dict()
    if layout == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    payload = {"state_dict": state, "epoch": 3} if layout == "state_dict" else state
    path = tmp_path / "hiera.pth"
    torch.save(payload, path)

    loaded = build(micro_variant, path)
    images = torch.randn(2, 3, 224, 224)
    for got, want in zip(_outputs(loaded, images), _outputs(source, images), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert loaded.weights.kind == "file" and loaded.weights.checkpoint_format == "timm"
    assert loaded.weights.state_sha256 == source.weights.state_sha256
    assert loaded.weights.file_sha256 is not None and len(loaded.weights.file_sha256) == 64


def test_safetensors_checkpoint(micro_variant: Variant, tmp_path: Path) -> None:
    source = _trained_like(micro_variant)
    path = tmp_path / "hiera.safetensors"
    state = {k: v.contiguous() for k, v in source.module.backbone.state_dict().items()}
    save_file(state, str(path))
    loaded = build(micro_variant, path)
    assert loaded.weights.state_sha256 == source.weights.state_sha256


def test_official_checkpoint_matches_official_model(micro_variant: Variant, tmp_path: Path) -> None:
    """A checkpoint saved by facebookresearch/hiera loads strictly and reproduces its outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import hiera as official

    torch.manual_seed(11)
    reference = official.Hiera(num_classes=1000, **MICRO_KWARGS).eval()
    path = tmp_path / "official.pth"
    torch.save({"model_state": reference.state_dict()}, path)
    assert detect_format(read_state_dict(path)) == "official"

    loaded = build(micro_variant, path)
    assert loaded.weights.checkpoint_format == "official"
    images = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        probabilities = reference(images)  # the official model applies softmax in eval mode
        logits, embedding = loaded.module(images)
    torch.testing.assert_close(logits.softmax(dim=-1), probabilities, rtol=0, atol=1e-6)
    assert embedding.shape == (3, 128)


def test_mismatched_architecture_names_the_keys(micro_variant: Variant, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(build("hiera_tiny_224", "random").module.backbone.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        build(micro_variant, path)
    message = str(info.value)
    assert "shape mismatches: blocks.0.attn.proj.bias: checkpoint (96,) vs model (16,)" in message
    assert "unexpected keys" in message and "blocks.10.attn.proj.bias" in message
    assert "missing keys: blocks.2.proj.bias" in message
    assert "--variant" in message


def test_missing_and_unexpected_keys_are_listed(micro_variant: Variant, tmp_path: Path) -> None:
    state = _trained_like(micro_variant).module.backbone.state_dict()
    del state["head.fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: head\.fc\.bias.*extra\.weight"):
        build(micro_variant, path)


def test_pickled_code_is_refused(micro_variant: Variant, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model_state": {"w": torch.zeros(1)}, "hook": Path("/etc/passwd")}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build(micro_variant, path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_file(micro_variant: Variant, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build(micro_variant, path)


def test_missing_file(micro_variant: Variant, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build(micro_variant, tmp_path / "nope.pth")
