"""Bucketed static-buffer runs: bucket choice, padding, copy-out, and the torch backend's use.

The CUDA implementation only adds capture and replay; everything else is the bookkeeping that
`StandIn` exercises here on the CPU. `tests/service/runtime/test_graphs_gpu.py` replays real
graphs where a GPU is present.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from model.hiera import BuiltModel
from service.runtime.graphs import BucketRunner, StandIn, StaticSpec, bucket_for, buckets
from service.runtime.torch_backends import TorchBackend

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [(1, [1]), (2, [1, 2]), (5, [1, 2, 4, 5]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])],
)
def test_buckets_are_powers_of_two_below_the_maximum_and_the_maximum(
    max_batch_size: int, expected: list[int]
) -> None:
    assert buckets(max_batch_size) == expected


def test_each_batch_goes_to_the_smallest_bucket_that_holds_it() -> None:
    sizes = buckets(6)
    assert {size: bucket_for(size, sizes) for size in range(1, 7)} == {
        1: 1, 2: 2, 3: 4, 4: 4, 5: 6, 6: 6,
    }  # fmt: skip
    for size in (0, 7):
        with pytest.raises(ValueError, match="does not fit"):
            bucket_for(size, sizes)


def rows_and_batch_sum(images: torch.Tensor) -> Sequence[torch.Tensor]:
    """Each row plus the whole batch's sum: a module that would show stale padding rows."""
    flat = images.flatten(1)
    return flat + flat.sum(dim=0, keepdim=True), flat * 2


def runner(forward: object = rows_and_batch_sum, max_batch_size: int = 6) -> StandIn:
    standin = StandIn(forward, StaticSpec(max_batch_size, (2,), torch.float32, CPU))  # type: ignore[arg-type]
    standin.prepare()
    return standin


def test_padding_rows_are_zeros_and_their_outputs_are_dropped() -> None:
    graphs = runner()
    graphs(torch.full((4, 2), 1.0))  # bucket 4 now last held four rows of ones
    summed, doubled = graphs(torch.full((3, 2), 2.0))
    # Padded to [2, 2, 2, 0] per column: each row is 2 + 6. A stale fourth row would add 1.
    assert summed.tolist() == [[8.0, 8.0]] * 3
    assert doubled.tolist() == [[4.0, 4.0]] * 3


def test_outputs_are_copies_the_next_replay_leaves_alone() -> None:
    graphs = runner()
    first, _ = graphs(torch.full((2, 2), 1.0))
    graphs(torch.full((2, 2), 5.0))  # same bucket: its static outputs are overwritten
    assert first.tolist() == [[3.0, 3.0], [3.0, 3.0]]


@pytest.mark.parametrize("max_batch_size", [5, 6, 8])
def test_every_size_equals_the_module_on_the_zero_padded_batch(max_batch_size: int) -> None:
    linear = torch.nn.Linear(2, 3).eval()

    def forward(images: torch.Tensor) -> Sequence[torch.Tensor]:
        return (linear(images),)

    graphs = runner(forward, max_batch_size)
    rng = np.random.default_rng(max_batch_size)
    with torch.inference_mode():
        for size in range(1, max_batch_size + 1):
            batch = torch.from_numpy(rng.standard_normal((size, 2), dtype=np.float32))
            bucket = next(b for b in (1, 2, 4, 8, max_batch_size) if b >= size)
            padded = torch.zeros((bucket, 2))
            padded[:size] = batch
            (got,) = graphs(batch)
            assert got.shape == (size, 3)
            assert torch.equal(got, linear(padded)[:size])


def test_a_batch_beyond_the_largest_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        runner()(torch.zeros((7, 2)))


@pytest.fixture(scope="module")
def graphed_backends(micro_model: BuiltModel) -> tuple[TorchBackend, TorchBackend]:
    graphed = TorchBackend(
        copy.deepcopy(micro_model.module), name="eager", device="cpu", precision="fp32",
        graphs=StandIn,
    )  # fmt: skip
    graphed.prepare(4, (3, 224, 224))
    plain = TorchBackend(
        copy.deepcopy(micro_model.module), name="eager", device="cpu", precision="fp32"
    )
    return graphed, plain


@pytest.mark.parametrize("size", [1, 3, 4])
def test_the_backend_replays_its_buckets_bit_for_bit(
    graphed_backends: tuple[TorchBackend, TorchBackend], size: int
) -> None:
    graphed, plain = graphed_backends
    assert graphed.cuda_graphs and not plain.cuda_graphs
    batch = np.random.default_rng(size).standard_normal((size, 3, 224, 224), dtype=np.float32)
    bucket = 1 if size == 1 else 4
    padded = np.zeros((bucket, 3, 224, 224), np.float32)
    padded[:size] = batch
    logits, embedding = graphed.infer(batch)
    want_logits, want_embedding = plain.infer(padded)
    np.testing.assert_array_equal(logits, want_logits[:size])
    np.testing.assert_array_equal(embedding, want_embedding[:size])
    # Unpadded, the matmuls run at another shape: equal but for rounding.
    unpadded_logits, _ = plain.infer(batch)
    np.testing.assert_allclose(logits, unpadded_logits, rtol=1e-4, atol=1e-5)


def test_a_batch_larger_than_the_graphs_runs_eagerly(
    graphed_backends: tuple[TorchBackend, TorchBackend],
) -> None:
    graphed, plain = graphed_backends
    batch = np.random.default_rng(9).standard_normal((5, 3, 224, 224), dtype=np.float32)
    np.testing.assert_array_equal(graphed.infer(batch)[1], plain.infer(batch)[1])


class FailingCapture(BucketRunner):
    def _capture(self, bucket: int, static: torch.Tensor) -> Sequence[torch.Tensor]:
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_leaves_the_backend_running_ungraphed(micro_model: BuiltModel) -> None:
    backend = TorchBackend(
        copy.deepcopy(micro_model.module), name="eager", device="cpu", precision="fp32",
        graphs=lambda forward, spec: FailingCapture(spec),
    )  # fmt: skip
    backend.prepare(2, (3, 224, 224))
    assert not backend.cuda_graphs
    logits, _ = backend.infer(np.zeros((2, 3, 224, 224), np.float32))
    assert logits.shape[0] == 2


def test_graphs_and_device_postprocessing_apply_to_cuda_devices_only() -> None:
    from service.runtime.graphs import CudaGraphs
    from service.runtime.loader import torch_gpu_options
    from service.settings import Settings

    on = Settings(weights="random", backend="eager", max_top_k=7)
    off = on.model_copy(update={"cuda_graphs": False})
    assert torch_gpu_options(on, "cpu") == {}
    assert torch_gpu_options(on, "cuda:1") == {"graphs": CudaGraphs, "device_top_k": 7}
    assert torch_gpu_options(off, "cuda:0") == {"graphs": None, "device_top_k": 7}
