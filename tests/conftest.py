"""Fixtures shared by the model and service tests: small random-init Hiera models."""

from __future__ import annotations

import os

# Tests never touch the network: make any hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest

from model.export import export_repository
from model.hiera import BuiltModel, build
from model.variants import Variant, custom_variant

# Same architecture family as hiera_tiny_224, with 16-wide first stage and one block per
# stage: every code path of the real model (mask-unit attention, q-pooling, unroll) at ~1/100
# of the cost. Embedding width 128.
MICRO_KWARGS = {"embed_dim": 16, "num_heads": 1, "stages": (1, 1, 1, 1)}


@pytest.fixture(scope="session")
def micro_variant() -> Variant:
    return custom_variant("hiera_tiny_224", "hiera_micro", **MICRO_KWARGS)


@pytest.fixture(scope="session")
def micro_model(micro_variant: Variant) -> BuiltModel:
    return build(micro_variant, "random", seed=0)


@pytest.fixture(scope="session")
def micro_repository(tmp_path_factory: pytest.TempPathFactory, micro_model: BuiltModel) -> Path:
    """A model repository with every artifact kind, exported once per test session."""
    root = tmp_path_factory.mktemp("model_repository")
    return export_repository(micro_model, root, formats=("onnx", "torchscript", "onnx_fp16"))
