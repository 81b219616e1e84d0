"""Build a Hiera model that returns class logits and the pooled embedding from one pass."""

from __future__ import annotations

import hashlib
import logging
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models.hiera import Hiera
from torch import nn

from model.attention import fold_mask_units
from model.checkpoints import load_into
from model.variants import Variant, get_variant

log = logging.getLogger(__name__)

WeightsKind = Literal["pretrained", "random", "file"]


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be fetched or found in the local cache."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: the hub, a local checkpoint, or an explicit random init."""

    kind: WeightsKind
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | Path) -> WeightsSource:
        """Parse `pretrained`, `random` or a checkpoint path."""
        value = str(text).strip()
        if value in ("pretrained", "random"):
            return cls(value)  # type: ignore[arg-type]
        if not value:
            raise ValueError("weights must be 'pretrained', 'random' or a checkpoint path")
        return cls("file", Path(value).expanduser())

    def __str__(self) -> str:
        return str(self.path) if self.kind == "file" else self.kind


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of the loaded weights; `state_sha256` identifies the exact tensors."""

    source: str  # "pretrained:<hub name>", "random", or the checkpoint path
    kind: WeightsKind
    state_sha256: str
    file_sha256: str | None = None
    checkpoint_format: str | None = None
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


class ServingHiera(nn.Module):
    """Wrap a timm Hiera so that forward returns `(logits [B, C], embedding [B, D])`."""

    def __init__(self, backbone: Hiera) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, 3, H, W] -> [B, N, C]: tokens of the last stage, still in mask-unit order, which
        # does not matter because the head pools over all of them.
        tokens = self.backbone.forward_features(images)
        # [B, N, C] -> [B, D]: mean pool + LayerNorm, the features the classifier sees.
        embedding = self.backbone.forward_head(tokens, pre_logits=True)
        # One linear layer on the same features, so both outputs cost one pass.
        logits = self.backbone.head.fc(embedding)
        return logits, embedding


@dataclass
class BuiltModel:
    """An eval-mode ServingHiera with the facts the manifest records about it."""

    module: ServingHiera
    variant: Variant
    weights: WeightsInfo


def build(
    variant: str | Variant, weights: str | Path | WeightsSource, *, seed: int = 0
) -> BuiltModel:
    """Build `variant` in eval mode with `weights` (pretrained, random or a checkpoint path)."""
    spec = get_variant(variant) if isinstance(variant, str) else variant
    source = weights if isinstance(weights, WeightsSource) else WeightsSource.parse(weights)
    kwargs = dict(spec.model_kwargs)
    if source.kind == "pretrained":
        backbone = _from_hub(spec, kwargs)
        info = WeightsInfo(
            f"pretrained:{spec.pretrained_name}", "pretrained", state_digest(backbone)
        )
    elif source.kind == "random":
        backbone = _random(spec, kwargs, seed)
        info = WeightsInfo("random", "random", state_digest(backbone), seed=seed)
        log.warning(
            "RANDOM WEIGHTS: %s is randomly initialised (seed %d); its predictions are "
            "meaningless. Use --weights pretrained or a checkpoint path to serve a real model.",
            spec.name,
            seed,
        )
    else:
        assert source.path is not None  # parse() sets it for kind "file"
        backbone = _create(spec.timm_name, pretrained=False, kwargs=kwargs)
        loaded = load_into(backbone, source.path)
        info = WeightsInfo(
            str(source.path),
            "file",
            state_digest(backbone),
            file_sha256=loaded.sha256,
            checkpoint_format=loaded.format,
        )
    fold_mask_units(backbone)  # same weights and outputs; fused attention kernels on a GPU
    freeze_window_pos_embed(backbone)
    module = ServingHiera(backbone).eval().requires_grad_(False)  # inference only
    return BuiltModel(module, spec, info)


def freeze_window_pos_embed(backbone: Hiera) -> bool:
    """Compute an abs-win Hiera's position embedding once, for its one input size.

    `hiera_*_abswin_*` resizes its position embedding with antialiased bicubic interpolation on
    every forward. The result depends only on the weights and the fixed input size, and no ONNX
    opset can export that resize (`aten::_upsample_bicubic2d_aa`), so the model's only
    Apache-2.0 weights could not be served by ONNX Runtime. The embedding is computed here with
    timm's own `_pos_embed` (on zeros, so bit-identical) and kept as a non-persistent buffer:
    `state_dict`, checkpoints and the state digest are unchanged. Returns whether it applied.
    """
    if getattr(backbone, "pos_embed_win", None) is None or backbone.pos_embed is None:
        return False
    tokens = math.prod(backbone.tokens_spatial_shape)
    with torch.no_grad():
        zeros = torch.zeros(1, tokens, backbone.pos_embed.shape[1])
        frozen = backbone._pos_embed(zeros)  # [1, tokens, C]: the embedding alone
    backbone.register_buffer("serving_pos_embed", frozen, persistent=False)
    backbone._pos_embed = types.MethodType(_add_frozen_pos_embed, backbone)  # type: ignore[method-assign]
    return True


def _add_frozen_pos_embed(self: Hiera, x: torch.Tensor) -> torch.Tensor:
    frozen: torch.Tensor = self.serving_pos_embed  # type: ignore[assignment]
    return x + frozen


def _from_hub(spec: Variant, kwargs: dict[str, Any]) -> Hiera:
    try:
        return _create(spec.pretrained_name, pretrained=True, kwargs=kwargs)
    except Exception as exc:  # the hub raises OSError, HTTP and cache-miss errors alike
        raise WeightsUnavailable(
            f"could not load pretrained weights {spec.pretrained_name} from the Hugging Face "
            f"hub or its local cache ({type(exc).__name__}: {exc}). Fetch them once with network "
            "access, or pass a local checkpoint path (timm, official or .safetensors), or "
            "'random' for a random-init model"
        ) from exc


def _random(spec: Variant, kwargs: dict[str, Any], seed: int) -> Hiera:
    # fork_rng keeps the caller's global RNG untouched; the seed makes export and eager
    # serving of a "random" model produce the same tensors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _create(spec.timm_name, pretrained=False, kwargs=kwargs)
        fc = backbone.get_classifier()
        if isinstance(fc, nn.Linear):
            # timm zero-initialises the classifier, which would make every logit 0.
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.trunc_normal_(fc.bias, std=0.02)
    return backbone


def _create(name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> Hiera:
    import timm

    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not isinstance(model, Hiera):
        raise TypeError(f"timm built {type(model).__name__} for {name}, expected Hiera")
    return model


def state_digest(module: nn.Module) -> str:
    """Return a sha256 over the names, dtypes, shapes and bytes of every tensor in `module`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
