"""Device postprocessing agrees with the host's: same classes in the same order, same scores.

Run on CPU tensors here; the kernels are the same torch ops on a GPU (the gpu-marked test in
test_graphs_gpu.py runs them there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.postprocess import BatchOutputs, best_k, normalize, softmax
from service.runtime.device_post import postprocess, rank, unit_rows

LABELS = [f"class {i}" for i in range(1000)]


def host_ranking(row: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """What the host answer path returns for one logit row."""
    probabilities = softmax(row)
    best = best_k(probabilities, k)
    return best, probabilities[best]


@pytest.mark.parametrize("k", [1, 5, 100, 1000])
def test_ranking_matches_the_host_on_random_logits(k: int) -> None:
    logits = np.random.default_rng(k).standard_normal((6, 1000), dtype=np.float32) * 4
    indices, scores = rank(torch.from_numpy(logits), k)
    for row in range(6):
        best, expected = host_ranking(logits[row], k)
        assert indices[row].tolist() == best
        np.testing.assert_allclose(scores[row].numpy(), expected, rtol=1e-6)


def test_ties_go_to_the_lower_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]])
    indices, scores = rank(logits, 4)
    assert indices.tolist() == [[1, 2, 4, 5]]
    assert scores[0, 0] == scores[0, 1] == scores[0, 2]


def test_probabilities_that_underflow_to_zero_tie_by_index_as_on_the_host() -> None:
    # exp(-1000) and exp(-3000) are both 0 in float64: the host ranks them by index, not logit.
    logits = torch.tensor([[0.0, -3000.0, -1000.0, -2000.0]])
    indices, scores = rank(logits, 4)
    assert indices.tolist() == [[0, 1, 2, 3]]
    assert scores.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_unit_rows_match_the_host_and_zero_rows_stay_zero() -> None:
    embedding = np.random.default_rng(3).standard_normal((4, 96), dtype=np.float32) * 10
    embedding[2] = 0.0
    got = unit_rows(torch.from_numpy(embedding)).numpy()
    for row in range(4):
        np.testing.assert_allclose(got[row], normalize(embedding[row]), rtol=1e-6, atol=1e-7)
    assert not got[2].any()


def test_postprocess_answers_as_the_host_batch_outputs_do() -> None:
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((3, 1000), dtype=np.float32) * 3
    embedding = rng.standard_normal((3, 64), dtype=np.float32)
    device = postprocess(
        torch.from_numpy(logits), torch.from_numpy(embedding), top_k=100, want_logits=False
    )
    host = BatchOutputs(logits, embedding)
    assert device.logits is None
    for row in range(3):
        for k in (1, 5, 100):
            got, want = device.top_k(row, LABELS, k), host.top_k(row, LABELS, k)
            assert [p.index for p in got] == [p.index for p in want]
            np.testing.assert_allclose([p.score for p in got], [p.score for p in want], rtol=1e-6)
        np.testing.assert_allclose(device.unit[row], host.unit[row], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(device.embedding[row], embedding[row])
    with pytest.raises(ValueError, match="ranked only 100"):
        device.best(0, 101)


def test_k_is_capped_at_the_classes_and_logits_come_back_when_asked() -> None:
    logits = np.array([[0.5, 2.0, -1.0]], np.float32)
    outputs = postprocess(torch.from_numpy(logits), torch.ones((1, 4)), top_k=100, want_logits=True)
    assert outputs.ranked is not None and outputs.ranked[0].tolist() == [[1, 0, 2]]
    assert outputs.logits is not None
    np.testing.assert_array_equal(outputs.logits, logits)
    np.testing.assert_array_equal(outputs.unit, np.full((1, 4), 0.5, np.float32))


def test_host_batch_outputs_rank_beyond_the_device_when_logits_are_there() -> None:
    logits = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
    ranked = (np.array([[3]]), np.array([[0.6]]))
    outputs = BatchOutputs(logits, np.ones((1, 2), np.float32), ranked=ranked)
    assert outputs.best(0, 1)[0].tolist() == [3]
    indices, _ = outputs.best(0, 3)  # more than the device ranked: from the logits
    assert indices.tolist() == [3, 2, 1]
