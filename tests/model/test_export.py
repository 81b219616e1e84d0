from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import parity
from model.artifacts import ArtifactTampered, ModelRepository, RepositoryError
from model.cli import main as export_main
from model.export import ExportError, ParityError, export_repository, parse_formats
from model.hiera import BuiltModel, build
from model.parity import eager_runner, onnx_runner, torchscript_runner


def test_repository_layout_and_manifest(micro_repository: Path, micro_model: BuiltModel) -> None:
    names = sorted(p.name for p in micro_repository.iterdir())
    assert names == ["labels.json", "manifest.json", "model.fp16.onnx", "model.onnx", "model.ts"]
    repo = ModelRepository.load(micro_repository)  # verifies every checksum
    m = repo.manifest
    assert m.name == "hiera_micro" and m.variant.timm_name == "hiera_tiny_224"
    assert m.variant.model_kwargs == {"embed_dim": 16, "num_heads": 1, "stages": [1, 1, 1, 1]}
    assert m.embed_dim == 128 and m.num_classes == 1000
    assert m.weights.kind == "random" and m.weights.seed == 0
    assert m.weights.state_sha256 == micro_model.weights.state_sha256
    assert m.preprocessing.input_size == (224, 224) and m.preprocessing.crop_pct == 0.9
    assert m.output_names == ("logits", "embedding")
    assert {"torch", "timm", "onnx", "onnxruntime"} <= set(m.versions)
    assert len(repo.labels) == 1000 and repo.labels[207] == "golden retriever"
    for kind, artifact in m.artifacts.items():
        assert artifact.parity is not None and artifact.parity.passed, kind
        assert artifact.parity.batch_sizes == [1, 5]
        assert artifact.bytes == (micro_repository / artifact.file).stat().st_size
    assert m.artifacts["onnx"].parity.embedding_max_abs < 1e-4  # type: ignore[union-attr]
    assert m.artifacts["onnx_fp16"].precision == "fp16"


@pytest.mark.parametrize("batch_size", [1, 5])
def test_artifacts_reproduce_eager_embeddings(
    micro_repository: Path, micro_model: BuiltModel, batch_size: int
) -> None:
    images = np.random.default_rng(batch_size).standard_normal(
        (batch_size, 3, 224, 224), dtype=np.float32
    )
    want_logits, want_emb = eager_runner(micro_model.module)(images)
    assert np.abs(want_logits).max() > 0.01  # a real head, so logit parity means something
    runners = {
        "onnx": (onnx_runner(micro_repository / "model.onnx"), 1e-4),
        "torchscript": (torchscript_runner(micro_repository / "model.ts"), 1e-5),
        "onnx_fp16": (onnx_runner(micro_repository / "model.fp16.onnx"), 2e-2),
    }
    for kind, (run, tol) in runners.items():
        logits, emb = run(images)
        assert emb.shape == (batch_size, 128) and logits.shape == (batch_size, 1000), kind
        np.testing.assert_allclose(emb, want_emb, rtol=0, atol=tol, err_msg=kind)
        np.testing.assert_allclose(logits, want_logits, rtol=0, atol=tol, err_msg=kind)


def test_tampered_artifact_is_refused(micro_repository: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(micro_repository, tmp_path / "copy"))
    with (copy / "model.onnx").open("r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactTampered, match=r"model\.onnx does not match"):
        ModelRepository.load(copy)
    ModelRepository.load(copy, verify=False)  # an explicit opt-out still reads it


def test_tampered_labels_and_missing_files(micro_repository: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(micro_repository, tmp_path / "copy"))
    labels = json.loads((copy / "labels.json").read_text())
    labels["names"][0] = "definitely not a tench"
    (copy / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(ArtifactTampered, match=r"labels\.json"):
        ModelRepository.load(copy)
    shutil.copy(micro_repository / "labels.json", copy / "labels.json")
    (copy / "model.ts").unlink()
    with pytest.raises(RepositoryError, match="missing"):
        ModelRepository.load(copy, verify=True)
    with pytest.raises(RepositoryError, match=r"manifest\.json"):
        ModelRepository.load(tmp_path)


def test_missing_artifact_kind_is_explained(micro_repository: Path) -> None:
    repo = ModelRepository.load(micro_repository, verify=False)
    assert repo.artifact_path("onnx") == micro_repository / "model.onnx"
    manifest = repo.manifest.model_copy(update={"artifacts": {}})
    with pytest.raises(RepositoryError, match="--formats"):
        ModelRepository(micro_repository, manifest, repo.labels).artifact_path("onnx")


def test_parity_failure_writes_nothing(
    micro_model: BuiltModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(parity.TOLERANCE, "fp32", -1.0)  # nothing can pass a negative bound
    with pytest.raises(ParityError, match="no manifest written"):
        export_repository(micro_model, tmp_path, formats=("onnx",))
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite(micro_model: BuiltModel, tmp_path: Path) -> None:
    (tmp_path / "hiera_micro").mkdir()
    with pytest.raises(ExportError, match="--overwrite"):
        export_repository(micro_model, tmp_path, formats=("torchscript",))
    target = export_repository(micro_model, tmp_path, formats=("torchscript",), overwrite=True)
    assert sorted(ModelRepository.load(target).manifest.artifacts) == ["torchscript"]


def test_parse_formats() -> None:
    assert parse_formats("torchscript, onnx") == ("onnx", "torchscript")
    with pytest.raises(ValueError, match="choose from"):
        parse_formats("onnx,tensorrt")


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main(["--variant", "hiera_tiny_224"]) == 2
    assert (
        export_main(["--variant", "hiera_tiny_224", "--weights", "random", "--formats", "x"]) == 2
    )
    assert export_main(["--variant", "hiera_tiny_224", "--weights", "/nonexistent.pth"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert export_main(["--list-variants"]) == 0
    assert "hiera_huge_224" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_exports_real_tiny_variant(tmp_path: Path) -> None:
    """docs/models/export.md's command: full-size hiera_tiny_224, random weights, ONNX + TS."""
    code = export_main(
        ["--variant", "hiera_tiny_224", "--weights", "random", "--out", str(tmp_path)]
    )
    assert code == 0
    repo = ModelRepository.load(tmp_path / "hiera_tiny_224")
    assert repo.manifest.embed_dim == 768
    for kind in ("onnx", "torchscript"):
        figures = repo.manifest.artifacts[kind].parity  # type: ignore[index]
        assert figures is not None and figures.passed
        assert figures.embedding_max_abs < 1e-4 and figures.embedding_min_cosine > 0.99999
    # Same seed, same tensors: the manifest identifies the weights an eager build would load.
    assert (
        repo.manifest.weights.state_sha256 == build("hiera_tiny_224", "random").weights.state_sha256
    )
