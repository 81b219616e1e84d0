"""Words both roles use about an engine: its states, and what a caller wants back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EngineState = Literal["loading", "ready", "draining", "failed", "stopped"]


@dataclass(frozen=True)
class Want:
    """What one input's caller needs back: the `top_k` best classes (0 = none), the raw
    embedding, the full logits. Across the corridor only these cross back."""

    top_k: int = 0
    embedding: bool = False
    logits: bool = False


EVERYTHING = Want(top_k=0, embedding=True, logits=True)
