"""Turn model outputs into answers: softmax + top-k, and embedding normalisation/encoding."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


def softmax(logits: np.ndarray) -> np.ndarray:
    """Return probabilities for a [C] logit row, computed in float64 for stable small scores."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum())


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
    """Return the k most probable classes, best first (ties broken by lower index)."""
    probabilities = softmax(logits)
    # A stable sort keeps equal scores in index order, also across the k-th place (which
    # argpartition does not); for C = 1000 it costs ~20 us.
    order = np.argsort(-probabilities, kind="stable")[:k].tolist()
    return [Prediction(i, labels[i], float(probabilities[i])) for i in order]


def normalize(embedding: np.ndarray) -> np.ndarray:
    """Scale to unit L2 norm (cosine similarity becomes a dot product); zero stays zero."""
    vector = embedding.astype(np.float32)
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    return vector / np.float32(norm) if norm > 0 else vector


def encode_base64(embedding: np.ndarray) -> str:
    """Encode as base64 of little-endian float32 bytes (`np.frombuffer(b, '<f4')` decodes)."""
    return base64.b64encode(embedding.astype("<f4").tobytes()).decode("ascii")
