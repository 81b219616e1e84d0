"""The Triton layout: config.pbtxt parsed as a real ModelConfig and checked against the graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from model.artifacts import ModelRepository
from model.cli import main as export_main
from model.hiera import BuiltModel
from model.triton import write_triton_layout

_ONNX_TYPES = {onnx.TensorProto.FLOAT: mc.TYPE_FP32}


@pytest.fixture
def model_folder(micro_repository: Path, tmp_path: Path) -> Path:
    # A copy: the session's repository must keep its exact file list for the export tests.
    return Path(shutil.copytree(micro_repository, tmp_path / "hiera_micro"))


def _config(folder: Path) -> mc.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_onnx_config_matches_the_graph(model_folder: Path) -> None:
    write_triton_layout(model_folder, max_batch_size=16, max_queue_delay_us=2000)
    config = _config(model_folder)
    assert config.name == "hiera_micro" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    graph = onnx.load(str(model_folder / "1" / "model.onnx")).graph
    declared = [(t.name, t.data_type, list(t.dims)) for t in [*config.input, *config.output]]
    assert declared == [
        ("images", mc.TYPE_FP32, [3, 224, 224]),
        ("logits", mc.TYPE_FP32, [1000]),
        ("embedding", mc.TYPE_FP32, [128]),
    ]
    graph_tensors = [*graph.input, *graph.output]
    assert [(v.name, _ONNX_TYPES[v.type.tensor_type.elem_type]) for v in graph_tensors] == [
        (name, dtype) for name, dtype, _ in declared
    ]
    for value, (_, _, dims) in zip(graph_tensors, declared, strict=True):
        graph_dims = _dims(value)
        assert isinstance(graph_dims[0], str), f"{value.name}: batch axis must be dynamic"
        assert len(graph_dims) == len(dims) + 1
        # A symbolic width (the exporter leaves the embedding's) is pinned by running the
        # graph in test_config_names_run_the_version_artifact; a static one must match.
        for graph_dim, dim in zip(graph_dims[1:], dims, strict=True):
            assert isinstance(graph_dim, str) or graph_dim == dim, value.name
    # Same bytes as the artifact hiera-serve verifies, and the folder still loads for it.
    assert (model_folder / "1" / "model.onnx").read_bytes() == (
        model_folder / "model.onnx"
    ).read_bytes()
    ModelRepository.load(model_folder)
    labels = (model_folder / config.output[0].label_filename).read_text().splitlines()
    assert labels == json.loads((model_folder / "labels.json").read_text())["names"]


def test_config_names_run_the_version_artifact(model_folder: Path) -> None:
    write_triton_layout(model_folder)
    config = _config(model_folder)
    session = ort.InferenceSession(
        str(model_folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    batch = np.zeros((3, *config.input[0].dims), np.float32)
    outputs = session.run([o.name for o in config.output], {config.input[0].name: batch})
    assert [list(o.shape) for o in outputs] == [[3, *o.dims] for o in config.output]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_config_follows_the_pytorch_naming_convention(
    model_folder: Path, micro_model: BuiltModel
) -> None:
    write_triton_layout(model_folder, platform="pytorch_libtorch")
    config = _config(model_folder)
    assert config.platform == "pytorch_libtorch"
    assert [t.name for t in config.input] == ["images__0"]
    assert [t.name for t in config.output] == ["logits__0", "embedding__1"]
    traced = torch.jit.load(str(model_folder / "1" / "model.pt"))
    pixels = torch.randn(2, *config.input[0].dims)
    with torch.inference_mode():
        got = traced(pixels)
        want = micro_model.module(pixels)
    # Output i of the module is the tensor named <name>__i.
    for index, spec in enumerate(config.output):
        assert int(spec.name.rsplit("__", 1)[1]) == index
        assert list(got[index].shape) == [2, *spec.dims]
        torch.testing.assert_close(got[index], want[index], rtol=0, atol=1e-5)


def test_cli_triton_flag(
    tmp_path: Path, micro_model: BuiltModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("model.hiera.build", lambda *args, **kwargs: micro_model)
    base = ["--variant", "hiera_tiny_224", "--weights", "random", "--out", str(tmp_path)]
    assert export_main([*base, "--formats", "onnx", "--triton", "torchscript"]) == 2
    assert (
        export_main([*base, "--formats", "onnx", "--triton", "--triton-max-batch-size", "4"]) == 0
    )
    config = _config(tmp_path / "hiera_micro")
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert (tmp_path / "hiera_micro" / "1" / "model.onnx").is_file()
