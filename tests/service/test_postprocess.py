"""Tests for turning model outputs into answers: softmax, top-k, normalisation, base64."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from service.postprocess import (
    BatchOutputs,
    Prediction,
    best_k,
    best_k_rows,
    encode_base64,
    normalize,
    normalize_rows,
    softmax,
    softmax_rows,
    top_k,
)

pytestmark = pytest.mark.timeout(20)


def reference_softmax(logits: np.ndarray) -> np.ndarray:
    """Plain float64 softmax, stabilised by the max, to compare against."""
    x = np.asarray(logits, np.float64)
    exp = np.exp(x - x.max())
    return exp / exp.sum()


def names(count: int) -> list[str]:
    return [f"class_{i}" for i in range(count)]


# --- softmax ----------------------------------------------------------------------------------


def test_softmax_matches_float64_reference_and_sums_to_one() -> None:
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 5

    probabilities = softmax(logits)

    assert probabilities.shape == (1000,)
    assert probabilities.dtype == np.float64
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(probabilities, reference_softmax(logits), rtol=1e-12, atol=0)


def test_softmax_of_huge_logits_does_not_overflow() -> None:
    logits = np.array([1e4, 1e4 - 1.0, 1e4 - 2.0, -1e4], np.float32)

    with np.errstate(over="raise", invalid="raise"):
        probabilities = softmax(logits)

    assert np.all(np.isfinite(probabilities))
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)
    # Only the differences matter: the same as softmax([0, -1, -2, -20000]).
    expected = reference_softmax(np.array([0.0, -1.0, -2.0, -2e4]))
    np.testing.assert_allclose(probabilities, expected, rtol=1e-12, atol=0)
    assert probabilities[3] == 0.0


def test_softmax_of_equal_logits_is_uniform() -> None:
    np.testing.assert_allclose(softmax(np.full(8, 3.5, np.float32)), np.full(8, 1 / 8))


def test_softmax_keeps_tiny_probabilities_that_float32_would_flush() -> None:
    # exp(-120) ~ 7.7e-53 underflows to 0 in float32 but not in float64.
    probabilities = softmax(np.array([0.0, -120.0], np.float32))

    assert probabilities[1] > 0
    assert probabilities[1] == pytest.approx(np.exp(-120.0), rel=1e-9)


# --- top_k ------------------------------------------------------------------------------------


def test_top_k_returns_the_k_best_in_descending_order() -> None:
    logits = np.array([0.1, 2.0, -1.0, 3.0, 0.5, 2.5], np.float32)
    labels = names(6)

    result = top_k(logits, labels, 3)

    assert [p.index for p in result] == [3, 5, 1]
    assert [p.label for p in result] == ["class_3", "class_5", "class_1"]
    expected = reference_softmax(logits)
    assert [p.score for p in result] == pytest.approx([expected[3], expected[5], expected[1]])
    assert all(isinstance(p.score, float) for p in result)
    assert result[0].score > result[1].score > result[2].score


def test_top_k_matches_a_full_sort_on_random_logits() -> None:
    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32)

    result = top_k(logits, names(1000), 10)

    expected = np.argsort(-logits, kind="stable")[:10].tolist()
    assert [p.index for p in result] == expected
    assert result[0] == Prediction(expected[0], f"class_{expected[0]}", result[0].score)


@pytest.mark.parametrize("seed", range(12))
def test_best_k_is_the_first_k_of_a_stable_full_sort(seed: int) -> None:
    # Partition then sort only the contenders: the same indices in the same order as sorting
    # everything stably, for every k, with ties inside the winners and at the k-th place.
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(1, 60))
    scores = rng.integers(0, 4 if seed % 2 else 1000, classes).astype(np.float64)
    if seed % 3 == 0:
        scores[rng.integers(0, classes, 3)] = np.nan  # NaN sorts last, as argsort puts it
    for k in range(1, classes + 3):
        assert best_k(scores, k) == np.argsort(-scores, kind="stable")[:k].tolist()


@pytest.mark.parametrize("seed", range(12))
def test_best_k_rows_ranks_each_row_as_a_stable_full_sort_does(seed: int) -> None:
    # The whole batch at once: rows with ties at the k-th place, NaN and distinct scores mixed.
    rng = np.random.default_rng(seed)
    rows, classes = int(rng.integers(1, 9)), int(rng.integers(1, 60))
    scores = rng.integers(0, 4 if seed % 2 else 1000, (rows, classes)).astype(np.float64)
    if seed % 3 == 0:
        scores[0, rng.integers(0, classes, 3)] = np.nan
    for k in range(1, classes + 2):
        ranked = best_k_rows(scores, k)
        for row in range(rows):
            assert ranked[row].tolist() == np.argsort(-scores[row], kind="stable")[:k].tolist()


def test_batch_outputs_rank_every_row_once_per_k() -> None:
    logits = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    outputs = BatchOutputs(logits, np.ones((4, 8), np.float32))
    indices, scores = outputs.best(2, 5)
    again, _ = outputs.best(2, 5)
    assert indices.tolist() == best_k(softmax(logits[2]), 5)
    assert np.array_equal(scores, softmax(logits[2])[indices])
    assert again.base is indices.base  # one [B, k] array for the batch, not one per call


def test_top_k_breaks_ties_by_lower_index_inside_the_winners() -> None:
    logits = np.array([0.0, 5.0, 1.0, 5.0, 1.0, 5.0], np.float32)

    result = top_k(logits, names(6), 3)

    assert [p.index for p in result] == [1, 3, 5]
    assert len({p.score for p in result}) == 1


def test_top_k_of_all_equal_logits_picks_the_lowest_indices() -> None:
    result = top_k(np.zeros(20, np.float32), names(20), 3)

    assert [p.index for p in result] == [0, 1, 2]
    assert [p.score for p in result] == pytest.approx([1 / 20] * 3)


def test_top_k_breaks_ties_by_lower_index_at_the_cut_off() -> None:
    logits = np.array([0.0, 0.0, 1.0, 1.0], np.float32)

    result = top_k(logits, names(4), 1)

    assert [p.index for p in result] == [2]


def test_top_k_with_k_larger_than_the_class_count_returns_every_class() -> None:
    logits = np.array([1.0, 3.0, 2.0], np.float32)

    result = top_k(logits, ["a", "b", "c"], 10)

    assert [p.index for p in result] == [1, 2, 0]
    assert [p.label for p in result] == ["b", "c", "a"]
    assert sum(p.score for p in result) == pytest.approx(1.0)


def test_top_k_with_k_equal_to_one_returns_the_argmax() -> None:
    logits = np.random.default_rng(2).standard_normal(50).astype(np.float32)

    (best,) = top_k(logits, names(50), 1)

    assert best.index == int(np.argmax(logits))
    assert best.score == pytest.approx(float(reference_softmax(logits).max()))


# --- normalize --------------------------------------------------------------------------------


def test_normalize_gives_unit_norm_and_keeps_direction() -> None:
    embedding = np.random.default_rng(3).standard_normal(128).astype(np.float32) * 7

    unit = normalize(embedding)

    assert unit.dtype == np.float32
    assert float(np.linalg.norm(unit.astype(np.float64))) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(unit * np.linalg.norm(embedding), embedding, rtol=1e-5)


def test_normalize_converts_float64_input_to_float32() -> None:
    unit = normalize(np.array([3.0, 4.0], np.float64))

    assert unit.dtype == np.float32
    np.testing.assert_allclose(unit, [0.6, 0.8], rtol=1e-7)


def test_normalize_leaves_a_zero_vector_as_zeros() -> None:
    with np.errstate(divide="raise", invalid="raise"):
        unit = normalize(np.zeros(16, np.float32))

    assert unit.shape == (16,)
    assert unit.dtype == np.float32
    assert not np.any(unit)
    assert np.all(np.isfinite(unit))


def test_normalize_does_not_modify_its_input() -> None:
    embedding = np.array([1.0, 2.0, 2.0], np.float32)

    normalize(embedding)

    np.testing.assert_array_equal(embedding, [1.0, 2.0, 2.0])


# --- encode_base64 ----------------------------------------------------------------------------


def test_encode_base64_round_trips_as_little_endian_float32() -> None:
    embedding = np.random.default_rng(4).standard_normal(128).astype(np.float32)

    text = encode_base64(embedding)

    assert isinstance(text, str)
    decoded = np.frombuffer(base64.b64decode(text), "<f4")
    np.testing.assert_array_equal(decoded, embedding)
    assert len(base64.b64decode(text)) == 128 * 4


def test_encode_base64_converts_other_dtypes_and_byte_orders_to_little_endian_f4() -> None:
    big_endian = np.array([1.5, -2.25, 3.0], dtype=">f8")

    decoded = np.frombuffer(base64.b64decode(encode_base64(big_endian)), "<f4")

    np.testing.assert_array_equal(decoded, np.array([1.5, -2.25, 3.0], np.float32))


def test_encode_base64_of_known_bytes() -> None:
    # 1.0 as little-endian float32 is 00 00 80 3f.
    assert encode_base64(np.array([1.0], np.float32)) == base64.b64encode(
        b"\x00\x00\x80\x3f"
    ).decode("ascii")


# --- whole-batch postprocessing -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_batch_postprocessing_equals_the_per_row_functions_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, classes = int(rng.integers(1, 9)), int(rng.integers(2, 1100))
    logits = (rng.standard_normal((rows, classes)) * rng.uniform(0.1, 30)).astype(np.float32)
    if seed % 2:
        logits = np.round(logits)  # many ties, also across the k-th place
    embedding = rng.standard_normal((rows, 128)).astype(np.float32)
    embedding[0] = 0.0  # a zero row stays zero
    outputs = BatchOutputs(logits, embedding)
    labels = names(classes)
    for row in range(rows):
        assert np.array_equal(softmax_rows(logits)[row], softmax(logits[row]))
        assert np.array_equal(normalize_rows(embedding)[row], normalize(embedding[row]))
        assert np.array_equal(outputs.unit[row], normalize(embedding[row]))
        for k in (1, 5, classes):
            assert outputs.top_k(row, labels, k) == top_k(logits[row], labels, k)


def test_batch_outputs_postprocess_once_per_batch() -> None:
    outputs = BatchOutputs(np.zeros((3, 10), np.float32), np.ones((3, 4), np.float32))
    first = outputs.top_k(0, names(10), 3)
    probabilities = outputs.probabilities
    outputs.top_k(2, names(10), 3)
    assert outputs.probabilities is probabilities  # computed for all rows by the first call
    assert [p.index for p in first] == [0, 1, 2]  # all equal: lowest indices first
    np.testing.assert_allclose(outputs.unit, np.full((3, 4), 0.5, np.float32))


@pytest.mark.parametrize("seed", range(4))
def test_packed_rows_hold_each_rows_ranks_and_embedding_where_a_slot_expects_them(
    seed: int,
) -> None:
    # Built independently: a stable full sort of float64 softmax, then float32 bits.
    rng = np.random.default_rng(seed)
    rows, classes, width, room = 3, 40, 16, 10
    logits = rng.standard_normal((rows, classes)).astype(np.float32)
    if seed % 2:
        logits = np.round(logits)  # ties across the k-th place
    embedding = rng.standard_normal((rows, width)).astype(np.float32)
    outputs = BatchOutputs(logits, embedding)
    for k in (0, 1, 5, room):
        packed = outputs.packed(k, room)
        assert packed.dtype == np.int32 and packed.shape == (rows, 2 * room + width)
        assert outputs.packed(k, room) is packed  # once per batch for each k
        for row in range(rows):
            probabilities = reference_softmax(logits[row])
            order = np.argsort(-probabilities, kind="stable")[:k]
            assert packed[row, :k].tolist() == order.tolist()
            assert packed[row, k:room].tolist() == [0] * (room - k)
            scores = packed[row, room : room + k].view(np.float32)
            assert scores.tolist() == probabilities[order].astype(np.float32).tolist()
            assert np.array_equal(packed[row, 2 * room :].view(np.float32), embedding[row])


def test_packed_rows_of_a_device_ranked_batch_take_its_ranks() -> None:
    indices = np.array([[4, 1, 0], [2, 3, 1]], np.int64)
    scores = np.array([[0.5, 0.25, 0.125], [0.75, 0.125, 0.0625]], np.float32)
    embedding = np.arange(8, dtype=np.float32).reshape(2, 4)
    outputs = BatchOutputs(None, embedding, ranked=(indices, scores))
    packed = outputs.packed(2, 3)
    assert packed[:, :2].tolist() == [[4, 1], [2, 3]]
    assert packed[:, 3:5].view(np.float32).tolist() == [[0.5, 0.25], [0.75, 0.125]]
    assert packed[:, 6:].view(np.float32).tolist() == embedding.tolist()
    with pytest.raises(ValueError, match="ranked only 3"):
        outputs.packed(4, 5)
