"""Load Hiera weights from timm, official (facebookresearch/hiera) or safetensors files.

Loading never executes pickled code (`weights_only=True`) and never loads partially: any
missing, unexpected or wrongly shaped key fails the load with all of them named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from model.digests import sha256_file

CheckpointFormat = Literal["timm", "official"]

# Wrappers that training scripts put around the state dict, outermost first.
_WRAPPER_KEYS = ("model_state", "state_dict", "model", "module")
_OFFICIAL_MARKERS = ("head.projection.", "encoder_norm.", "pos_embed_abs")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What was loaded, for the manifest and the startup log."""

    path: str
    format: CheckpointFormat
    sha256: str
    num_tensors: int


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor mapping from a .safetensors or torch checkpoint."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors have no common base
        raise CheckpointError(
            f"cannot read checkpoint {path}: {exc}. Expected a torch state dict saved with "
            "torch.save (timm or official format) or a .safetensors file"
        ) from exc
    return _unwrap(raw, path)


def _unwrap(raw: object, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"checkpoint {path} holds no state dict")
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(raw):
        odd = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor))[:5]
        raise CheckpointError(f"checkpoint {path} has non-tensor entries: {odd}")
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def detect_format(state_dict: dict[str, torch.Tensor]) -> CheckpointFormat:
    """Tell the official facebookresearch/hiera key layout from timm's."""
    official = any(marker in key for key in state_dict for marker in _OFFICIAL_MARKERS)
    official = official or ("norm.weight" in state_dict and "head.norm.weight" not in state_dict)
    return "official" if official else "timm"


def to_timm_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert an official checkpoint to timm's key names with timm's own filter."""
    from timm.models.hiera import checkpoint_filter_fn

    return dict(checkpoint_filter_fn(state_dict, model))


def load_into(model: nn.Module, path: Path) -> LoadedCheckpoint:
    """Load a checkpoint file into `model` strictly, converting the official format first."""
    path = Path(path)
    state_dict = read_state_dict(path)
    fmt = detect_format(state_dict)
    if fmt == "official":
        state_dict = to_timm_keys(state_dict, model)
    check_fits(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)
    return LoadedCheckpoint(str(path), fmt, sha256_file(path), len(state_dict))


def check_fits(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if not (missing or unexpected or mis_shaped):
        return
    parts = [f"checkpoint {path} does not fit the model"]
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mis_shaped),
    ):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
            parts.append(f"{label}: {shown}")
    parts.append("check that --variant matches the architecture the checkpoint was trained with")
    raise CheckpointError("; ".join(parts))
