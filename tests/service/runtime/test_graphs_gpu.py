"""On a real GPU: replayed CUDA graphs give the eager module's bits, and device ranking the host's.

The comparison is at the bucket's shape (the eager run gets the same zero-padded batch): at
another shape cuBLAS may pick other kernels, which round differently.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from model.hiera import BuiltModel
from service.postprocess import BatchOutputs
from service.runtime.graphs import CudaGraphs, bucket_for, buckets
from service.runtime.torch_backends import TorchBackend, load_torchscript

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MAX_BATCH = 6  # not a power of two: buckets 1, 2, 4, 6
SHAPE = (3, 224, 224)
LABELS = [str(i) for i in range(1000)]


def backends(
    kind: str, precision: str, micro_model: BuiltModel, micro_repository: Path
) -> tuple[TorchBackend, TorchBackend]:
    def make(graphs: bool) -> TorchBackend:
        factory = CudaGraphs if graphs else None
        if kind == "torchscript":
            return load_torchscript(
                micro_repository / "model.ts", device="cuda:0", precision=precision,
                graphs=factory, device_top_k=100,
            )  # fmt: skip
        return TorchBackend(
            copy.deepcopy(micro_model.module), name="eager", device="cuda:0",
            precision=precision, graphs=factory, device_top_k=100,
        )  # fmt: skip

    graphed, plain = make(True), make(False)
    graphed.prepare(MAX_BATCH, SHAPE)
    return graphed, plain


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_replayed_graphs_equal_the_eager_module_bit_for_bit(
    micro_model: BuiltModel, micro_repository: Path, kind: str, precision: str
) -> None:
    graphed, plain = backends(kind, precision, micro_model, micro_repository)
    assert graphed.cuda_graphs
    rng = np.random.default_rng(0)
    for size in range(1, MAX_BATCH + 1):
        batch = rng.standard_normal((size, *SHAPE), dtype=np.float32)
        padded = np.zeros((bucket_for(size, buckets(MAX_BATCH)), *SHAPE), np.float32)
        padded[:size] = batch
        on_device = torch.from_numpy(batch).cuda()
        logits, embedding = graphed.infer(on_device)
        want_logits, want_embedding = plain.infer(torch.from_numpy(padded).cuda())
        np.testing.assert_array_equal(logits, want_logits[:size], err_msg=f"size {size}")
        np.testing.assert_array_equal(embedding, want_embedding[:size], err_msg=f"size {size}")
        # Device postprocessing of the same replay agrees with the host's answer path.
        device = graphed.infer_outputs(on_device, logits=False)
        host = BatchOutputs(logits, embedding)
        for row in range(size):
            got, want = device.top_k(row, LABELS, 5), host.top_k(row, LABELS, 5)
            assert [p.index for p in got] == [p.index for p in want]
            np.testing.assert_allclose([p.score for p in got], [p.score for p in want], rtol=1e-6)
        np.testing.assert_allclose(device.unit, host.unit, rtol=1e-6, atol=1e-7)
