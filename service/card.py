"""What both roles know of the served model: the card an engine loads and a front end shows.

Plain data with no runtime behind it, so a front end that never loads the model (torch and
ONNX Runtime stay out of its process) can still describe the model, check top_k against its
classes and label predictions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from service.imaging.preprocessing import Preprocessing


@dataclass(frozen=True)
class ModelCard:
    """What the service tells clients about the model it serves."""

    name: str
    variant: str
    preprocessing: Preprocessing
    embed_dim: int
    num_classes: int
    labels: list[str] = field(repr=False)
    weights_source: str
    weights_kind: str
    weights_sha256: str
    weights_license: str
    repository: str | None
    # The served artifact's file and, for a reduced precision, its measured agreement with fp32
    # on real photos (the manifest's figures), so /v1/models can show what int8 costs.
    artifact: str | None = None
    agreement: dict[str, Any] | None = None

    @property
    def random_weights(self) -> bool:
        return self.weights_kind == "random"

    def to_dict(self) -> dict[str, Any]:
        """Return the card as JSON-ready data (what an engine sends a front end)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Rebuild a card from `to_dict()`'s output."""
        pp = dict(data["preprocessing"])
        preprocessing = Preprocessing(
            input_size=tuple(pp.pop("input_size")),
            mean=tuple(pp.pop("mean")),
            std=tuple(pp.pop("std")),
            **pp,
        )
        return cls(**{**data, "preprocessing": preprocessing})
