"""ONNX Runtime CUDA graphs: the options asked for, and bucketed runs on bound static buffers.

Capture itself needs a GPU; the bookkeeping (one binding and graph id per bucket, fixed
buffers, padding, copy-out) runs here on a CPU session, whose I/O binding takes the same calls.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import service.runtime.onnx as onnx_module
from service.runtime import providers as ep
from service.runtime.base import BackendError
from service.runtime.graphs import StaticSpec
from service.runtime.onnx import OnnxBackend
from service.runtime.onnx_graphs import OrtGraphs
from tests.service.runtime.test_providers import GPU, FakeStream, FallingBackSession


def test_the_first_gpu_provider_alone_captures_graphs() -> None:
    assert ep.graph_provider([ep.TENSORRT, ep.CUDA, ep.CPU]) == ep.TENSORRT
    assert ep.graph_provider([ep.CUDA, ep.CPU]) == ep.CUDA
    assert ep.graph_provider([ep.CPU]) is None
    assert ep.graph_options(ep.CUDA) == {"enable_cuda_graph": "1"}
    assert ep.graph_options(ep.TENSORRT) == {"trt_cuda_graph_enable": "1"}
    with pytest.raises(ValueError, match="cannot capture"):
        ep.graph_options(ep.CPU)


@pytest.mark.parametrize(
    ("available", "graphed"),
    [([ep.CUDA, ep.CPU], ep.CUDA), ([ep.TENSORRT, ep.CUDA, ep.CPU], ep.TENSORRT)],
)
def test_sessions_ask_for_graphs_only_when_told_to(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch, available: list[str], graphed: str
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(ort, "InferenceSession", FallingBackSession)
    monkeypatch.setattr(onnx_module, "_instance_stream", lambda device: FakeStream())
    FallingBackSession.created.clear()
    for cuda_graph in (False, True):
        with pytest.raises(BackendError):  # the fake falls back to the CPU: refused as usual
            OnnxBackend(
                micro_repository / "model.onnx", device="cuda:0", precision="fp32",
                gpu=replace(GPU, cuda_graph=cuda_graph),
            )  # fmt: skip
    plain, graphs = FallingBackSession.created
    keys = {"enable_cuda_graph", "trt_cuda_graph_enable"}
    assert all(not keys & set(options) for options in plain.values())
    assert {p: keys & set(o) for p, o in graphs.items() if keys & set(o)} == {
        graphed: set(ep.graph_options(graphed))
    }
    assert graphs[graphed]["user_compute_stream"] == "1234"  # replayed on the instance's stream


def test_a_cpu_session_never_captures(micro_repository: Path) -> None:
    backend = OnnxBackend(
        micro_repository / "model.onnx", device="cpu", precision="fp32",
        gpu=replace(GPU, cuda_graph=True),
    )  # fmt: skip
    backend.prepare(4, (3, 224, 224))
    assert not backend.cuda_graphs and backend.device_top_k is None


@pytest.mark.parametrize("size", [1, 2, 3])
def test_bucketed_runs_on_bound_buffers_equal_the_session_on_the_padded_batch(
    micro_repository: Path, size: int
) -> None:
    session = ort.InferenceSession(str(micro_repository / "model.onnx"))
    graphs = OrtGraphs(session, StaticSpec(4, (3, 224, 224), torch.float32, torch.device("cpu")))
    graphs.prepare()
    assert sorted(graphs._runs) == [1, 2, 4]  # one binding and graph id per bucket
    batch = np.random.default_rng(size).standard_normal((size, 3, 224, 224), dtype=np.float32)
    bucket = {1: 1, 2: 2, 3: 4}[size]
    padded = np.zeros((bucket, 3, 224, 224), np.float32)
    padded[:size] = batch
    logits, embedding = graphs(torch.from_numpy(batch))
    want_logits, want_embedding = session.run(None, {session.get_inputs()[0].name: padded})
    np.testing.assert_array_equal(logits.numpy(), want_logits[:size])
    np.testing.assert_array_equal(embedding.numpy(), want_embedding[:size])
