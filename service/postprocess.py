"""Turn model outputs into answers: softmax + top-k, and embedding normalisation/encoding."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cached_property

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
    return [Prediction(i, labels[i], float(probabilities[i])) for i in best_k(probabilities, k)]


def best_k(scores: np.ndarray, k: int) -> list[int]:
    """Return the indices of the k highest of the [C] `scores`, best first, ties by lower
    index: exactly the first k of a stable sort, without sorting all C.

    The k-th highest score is found by partition (O(C)); only the scores at least as high are
    then sorted, stably and in index order, so equal scores, the k-th place's included, keep
    index order (argpartition alone would not). A full stable sort of C = 1000 doubles cost
    about 50 us of the event loop per answer (perf, one client).
    """
    negated = -scores
    if k < negated.shape[0]:
        threshold = np.partition(negated, k - 1)[k - 1]
        candidates = np.flatnonzero(negated <= threshold)
        if candidates.shape[0] >= k:  # fewer only with NaN scores: the full sort handles them
            order = candidates[np.argsort(negated[candidates], kind="stable")]
            return [int(i) for i in order[:k]]
    return [int(i) for i in np.argsort(negated, kind="stable")[:k]]


def best_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Return `[B, k]` indices: row i is exactly best_k(scores[i], k), for the whole batch at
    once.

    One partition over the batch finds each row's k-th score; a row with exactly k scores at
    least that high (the usual case) has its top k in one vectorised stable sort. Rows with
    ties at the k-th place (or NaN) go through best_k. Per row, best_k's Python and small
    numpy calls cost more than the partition itself.
    """
    rows, classes = scores.shape
    k = min(k, classes)
    if k == classes or rows == 0:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    negated = -scores
    kth = np.partition(negated, k - 1, axis=1)[:, k - 1 : k]
    chosen = negated <= kth
    exact = chosen.sum(axis=1) == k
    out = np.empty((rows, k), dtype=np.intp)
    if exact.any():
        # np.nonzero walks row by row, in index order: k column indices per exact row.
        columns = np.nonzero(chosen[exact])[1].reshape(-1, k)
        order = np.argsort(np.take_along_axis(negated[exact], columns, 1), 1, kind="stable")
        out[exact] = np.take_along_axis(columns, order, 1)
    for row in np.flatnonzero(~exact):
        out[row] = best_k(scores[row], k)
    return out


def normalize(embedding: np.ndarray) -> np.ndarray:
    """Scale to unit L2 norm (cosine similarity becomes a dot product); zero stays zero."""
    vector = embedding.astype(np.float32)
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    return vector / np.float32(norm) if norm > 0 else vector


def encode_base64(embedding: np.ndarray) -> str:
    """Encode as base64 of little-endian float32 bytes (`np.frombuffer(b, '<f4')` decodes)."""
    return base64.b64encode(embedding.astype("<f4").tobytes()).decode("ascii")


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Return probabilities for [B, C] logits; each row is exactly what softmax() returns."""
    shifted = logits.astype(np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def normalize_rows(embedding: np.ndarray) -> np.ndarray:
    """Scale each row of [B, D] to unit L2 norm (as normalize() does); zero rows stay zero."""
    vectors = embedding.astype(np.float32)
    wide = vectors.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide)).astype(np.float32)[:, None]
    return np.divide(vectors, norms, out=vectors.copy(), where=norms > 0)


class BatchOutputs:
    """One batch's outputs, postprocessed with whole-batch numpy calls on first use.

    Every request of a batch reads its own row; the first one to ask pays for all rows' softmax
    and unit vectors, so a batch of B costs one call of each instead of B. A runtime that
    postprocessed on its device (service.runtime.device_post) hands in its ranked classes and
    unit vectors instead; `logits` is then None unless some item of the batch asked for them.
    """

    def __init__(
        self,
        logits: np.ndarray | None,
        embedding: np.ndarray,
        *,
        ranked: tuple[np.ndarray, np.ndarray] | None = None,
        unit: np.ndarray | None = None,
    ) -> None:
        if logits is None and ranked is None:
            raise ValueError("BatchOutputs needs the logits or the ranked classes")
        self.logits = logits  # [B, C]
        self.embedding = embedding  # [B, D]
        # ([B, K] class indices, [B, K] probabilities), each row best first.
        self.ranked = ranked
        self._unit = unit

    def __len__(self) -> int:
        return int(self.embedding.shape[0])

    @cached_property
    def probabilities(self) -> np.ndarray:
        if self.logits is None:
            raise ValueError("these outputs carry no logits (the device ranked the classes)")
        return softmax_rows(self.logits)

    @property
    def unit(self) -> np.ndarray:
        if self._unit is None:
            self._unit = normalize_rows(self.embedding)
        return self._unit

    def best(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return row's k best class indices and their probabilities, best first, exactly as
        best_k() ranks them. Host-ranked batches rank every row at once, on the first call
        for `k`."""
        indices, scores = self.ranks(k)
        return indices[row], scores[row]

    def ranks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return every row's k best class indices and their probabilities, `[B, k]` each:
        the device's ranking cut to k, or the host's, made once per batch for each k."""
        ranks = self._ranks.get(k)
        if ranks is None:
            if self.ranked is not None and k <= self.ranked[0].shape[1]:
                ranks = (self.ranked[0][:, :k], self.ranked[1][:, :k])
            elif self.logits is None:
                width = 0 if self.ranked is None else self.ranked[0].shape[1]
                raise ValueError(f"asked for top {k}, the device ranked only {width} classes")
            else:
                indices = best_k_rows(self.probabilities, k)
                ranks = (indices, np.take_along_axis(self.probabilities, indices, 1))
            self._ranks[k] = ranks
        return ranks

    @cached_property
    def _ranks(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {}

    def packed(self, k: int, room: int) -> np.ndarray:
        """Return every row's outputs laid out as a corridor slot holds them
        (service.engine.shm): `[B, 2 * room + D]` int32, each row's k best class indices,
        then from column `room` their probabilities (float32 bits), then from column
        `2 * room` its embedding (float32 bits). Made once per batch for each k, so that an
        input's outputs reach its slot in one copy."""
        rows = self._packed.get((k, room))
        if rows is None:
            count, width = self.embedding.shape
            rows = np.zeros((count, 2 * room + width), np.int32)
            if k:
                indices, scores = self.ranks(k)
                rows[:, :k] = indices
                rows[:, room : room + k] = scores.astype(np.float32).view(np.int32)
            rows[:, 2 * room :] = self.embedding.astype(np.float32).view(np.int32)
            self._packed[(k, room)] = rows
        return rows

    @cached_property
    def _packed(self) -> dict[tuple[int, int], np.ndarray]:
        return {}

    def top_k(self, row: int, labels: list[str], k: int) -> list[Prediction]:
        """Return row's k most probable classes, best first, exactly as top_k() would."""
        indices, scores = self.best(row, k)
        return [
            Prediction(i, labels[i], s)
            for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
        ]
