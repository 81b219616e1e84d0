"""The manifest's serving fields are sealed in every artifact, and an edited manifest is refused."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from model.artifacts import ManifestMismatch, ModelRepository, RepositoryError
from model.contract import (
    ONNX_METADATA_KEY,
    TORCHSCRIPT_EXTRA_FILE,
    ContractUnreadable,
    read_sealed,
    seal_onnx,
)
from model.export import export_repository
from model.hiera import BuiltModel

Manifest = dict[str, Any]
MICRO_MEAN = [0.485, 0.456, 0.406]


@pytest.fixture(scope="module")
def all_kinds(tmp_path_factory: pytest.TempPathFactory, micro_model: BuiltModel) -> Path:
    """A repository with all four artifact kinds, int8 included (quantized after sealing)."""
    root = tmp_path_factory.mktemp("all_kinds")
    formats = ("onnx", "torchscript", "onnx_fp16", "onnx_int8")
    return export_repository(micro_model, root, formats=formats)


def onnx_metadata(path: Path) -> dict[str, list[str]]:
    """Every metadata_props entry, read by the onnx package (values listed per key)."""
    entries: dict[str, list[str]] = {}
    for prop in onnx.load(str(path), load_external_data=False).metadata_props:
        entries.setdefault(prop.key, []).append(prop.value)
    return entries


def torchscript_extra(path: Path) -> bytes:
    """The contract extra file, read by torch.jit.load itself."""
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return extra[TORCHSCRIPT_EXTRA_FILE]  # type: ignore[return-value]


def expected_contract(manifest: Manifest, kind: str) -> Manifest:
    """The fields the export promises to seal, picked from the manifest's JSON by hand."""
    weights = {k: v for k, v in manifest["weights"].items() if k != "source"}
    return {
        "variant": manifest["variant"],
        "weights": weights,
        "preprocessing": manifest["preprocessing"],
        "embed_dim": manifest["embed_dim"],
        "num_classes": manifest["num_classes"],
        "input_name": manifest["input_name"],
        "output_names": manifest["output_names"],
        "labels_sha256": manifest["labels_sha256"],
        "artifact": {"kind": kind, "precision": manifest["artifacts"][kind]["precision"]},
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_every_artifact_kind_carries_the_contract(all_kinds: Path) -> None:
    manifest = json.loads((all_kinds / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["preprocessing"]["mean"] == MICRO_MEAN and manifest["embed_dim"] == 128
    assert sorted(manifest["artifacts"]) == ["onnx", "onnx_fp16", "onnx_int8", "torchscript"]
    sealed_precisions: dict[str, str] = {}
    for kind, record in manifest["artifacts"].items():
        path = all_kinds / record["file"]
        if kind == "torchscript":
            sealed = json.loads(torchscript_extra(path))
        else:
            metadata = onnx_metadata(path)
            assert len(metadata[ONNX_METADATA_KEY]) == 1, kind  # the quantizer's copy replaced
            sealed = json.loads(metadata[ONNX_METADATA_KEY][0])
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            custom = session.get_modelmeta().custom_metadata_map
            assert json.loads(custom[ONNX_METADATA_KEY]) == sealed, kind
        assert sealed == expected_contract(manifest, kind), kind
        assert read_sealed(path, "torchscript" if kind == "torchscript" else "onnx") == sealed
        sealed_precisions[kind] = sealed["artifact"]["precision"]
    assert sealed_precisions == {
        "onnx": "fp32",
        "torchscript": "fp32",
        "onnx_fp16": "fp16",
        "onnx_int8": "int8",
    }


def test_untouched_repository_loads(all_kinds: Path) -> None:
    repo = ModelRepository.load(all_kinds)
    assert repo.manifest.preprocessing.mean == tuple(MICRO_MEAN)
    assert len(repo.labels) == 1000


def edited(source: Path, root: Path, change: Callable[[Manifest], None]) -> Path:
    """Copy a model folder and edit its manifest.json the way an operator would, by hand."""
    target = Path(shutil.copytree(source, root / source.name))
    manifest = json.loads((target / "manifest.json").read_text())
    change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def set_path(dotted: str, value: object) -> Callable[[Manifest], None]:
    def change(manifest: Manifest) -> None:
        *parents, last = dotted.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value

    return change


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "preprocessing.mean",
            [0, 0, 0],
            "field preprocessing.mean is [0.0, 0.0, 0.0] but model.onnx was exported with "
            "[0.485, 0.456, 0.406]",
        ),
        (
            "preprocessing.crop_pct",
            1.0,
            "field preprocessing.crop_pct is 1.0 but model.onnx was exported with 0.9",
        ),
        ("preprocessing.std", [1, 1, 1], "field preprocessing.std is [1.0, 1.0, 1.0]"),
        ("preprocessing.input_size", [256, 256], "field preprocessing.input_size is [256, 256]"),
        (
            "preprocessing.interpolation",
            "bilinear",
            'field preprocessing.interpolation is "bilinear" but model.onnx was exported with '
            '"bicubic"',
        ),
        ("preprocessing.crop_mode", "squash", 'field preprocessing.crop_mode is "squash"'),
        ("embed_dim", 768, "field embed_dim is 768 but model.onnx was exported with 128"),
        ("output_names", ["embedding", "logits"], 'field output_names is ["embedding", "logits"]'),
        ("variant.model_kwargs.embed_dim", 96, "field variant.model_kwargs.embed_dim is 96"),
        ("weights.kind", "pretrained", 'field weights.kind is "pretrained"'),
        ("artifacts.onnx.precision", "fp16", 'field artifacts.onnx.precision is "fp16"'),
    ],
)
def test_edited_manifest_is_refused_naming_the_field(
    micro_repository: Path, tmp_path: Path, field: str, value: object, message: str
) -> None:
    copy = edited(micro_repository, tmp_path, set_path(field, value))
    with pytest.raises(ManifestMismatch, match=re.escape(message)) as info:
        ModelRepository.load(copy)
    assert "edited after export" in str(info.value) and "re-export" in str(info.value)
    ModelRepository.load(copy, verify=False)  # the explicit opt-out still reads it


def test_labels_replaced_with_a_consistent_hash_are_refused(
    micro_repository: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(micro_repository, tmp_path / "copy"))
    labels = json.loads((copy / "labels.json").read_text())
    labels["names"] = [f"class {i}" for i in range(len(labels["names"]))]  # another label set
    (copy / "labels.json").write_text(json.dumps(labels))
    new_sha = hashlib.sha256((copy / "labels.json").read_bytes()).hexdigest()
    manifest = json.loads((copy / "manifest.json").read_text())
    old_sha, manifest["labels_sha256"] = manifest["labels_sha256"], new_sha
    (copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ManifestMismatch, match=f'labels_sha256 is "{new_sha}" but model.onnx '
                       f'was exported with "{old_sha}"'):  # fmt: skip
        ModelRepository.load(copy)


def test_a_kind_pointed_at_another_artifact_is_refused(
    micro_repository: Path, tmp_path: Path
) -> None:
    def swap(manifest: Manifest) -> None:
        manifest["artifacts"]["onnx"] = {**manifest["artifacts"]["onnx_fp16"], "precision": "fp32"}

    copy = edited(micro_repository, tmp_path, swap)
    with pytest.raises(ManifestMismatch, match=re.escape(
        'field artifacts.onnx (the kind of artifact) is "onnx" but model.fp16.onnx was '
        'exported with "onnx_fp16"')):  # fmt: skip
        ModelRepository.load(copy)


def test_format_1_repository_is_refused_with_a_re_export_hint(
    micro_repository: Path, tmp_path: Path
) -> None:
    copy = edited(micro_repository, tmp_path, set_path("format_version", 1))
    with pytest.raises(RepositoryError, match=r"format_version 1.*Re-export it with hiera-export"):
        ModelRepository.load(copy)
    assert ModelRepository.load(copy, verify=False).manifest.format_version == 1


def test_newer_format_is_refused_even_unverified(micro_repository: Path, tmp_path: Path) -> None:
    copy = edited(micro_repository, tmp_path, set_path("format_version", 3))
    with pytest.raises(RepositoryError, match="upgrade hiera-serve"):
        ModelRepository.load(copy, verify=False)


def test_artifact_without_a_contract_is_refused(micro_repository: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(micro_repository, tmp_path / "copy"))
    model = onnx.load(str(copy / "model.onnx"))
    del model.metadata_props[:]  # as a format-1 export, or an artifact from elsewhere, has it
    onnx.save(model, str(copy / "model.onnx"))
    sha = hashlib.sha256((copy / "model.onnx").read_bytes()).hexdigest()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"]["onnx"]["sha256"] = sha
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match=r"model\.onnx carries no serving contract"):
        ModelRepository.load(copy)


def test_manifest_without_artifacts_is_refused(micro_repository: Path, tmp_path: Path) -> None:
    copy = edited(micro_repository, tmp_path, set_path("artifacts", {}))
    with pytest.raises(RepositoryError, match="lists no artifacts"):
        ModelRepository.load(copy)


def tiny_onnx(path: Path, props: dict[str, str] | list[tuple[str, str]]) -> Path:
    """A one-node graph with a 1 MB initializer, doc string and metadata entries."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [262144], [0.5] * 262144)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [262144])],
        [weight],
    )
    model = helper.make_model(graph, doc_string="a doc string", producer_name="tests")
    for key, value in props.items() if isinstance(props, dict) else props:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_onnx_reader_agrees_with_the_onnx_package(tmp_path: Path) -> None:
    document = {"preprocessing": {"mean": [0.5, 0.5, 0.5]}, "name": "ü"}
    path = tiny_onnx(tmp_path / "m.onnx", {"other": "x", ONNX_METADATA_KEY: json.dumps(document)})
    assert read_sealed(path, "onnx") == document
    seal_onnx(path, {"replaced": True})
    assert onnx_metadata(path) == {"other": ["x"], ONNX_METADATA_KEY: ['{"replaced":true}']}
    assert read_sealed(path, "onnx") == {"replaced": True}
    assert read_sealed(tiny_onnx(tmp_path / "none.onnx", {"other": "x"}), "onnx") is None


def test_onnx_reader_refuses_ambiguous_or_broken_files(tmp_path: Path) -> None:
    entries = [(ONNX_METADATA_KEY, "{}"), (ONNX_METADATA_KEY, "{}")]
    twice = tiny_onnx(tmp_path / "twice.onnx", entries)
    with pytest.raises(ContractUnreadable, match="2 sealed contracts"):
        read_sealed(twice, "onnx")
    listed = tiny_onnx(tmp_path / "list.onnx", {ONNX_METADATA_KEY: "[1, 2]"})
    with pytest.raises(ContractUnreadable, match="not a JSON object"):
        read_sealed(listed, "onnx")
    data = tiny_onnx(tmp_path / "whole.onnx", {ONNX_METADATA_KEY: "{}"}).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractUnreadable):
        read_sealed(tmp_path / "cut.onnx", "onnx")
    with pytest.raises(ContractUnreadable, match="not a TorchScript archive"):
        read_sealed(tmp_path / "whole.onnx", "torchscript")
