from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm.data
import torch
from PIL import Image

from model import agreement
from model.agreement import calibration_photos, eval_batch, measure_agreement
from model.artifacts import ModelRepository
from model.export import AgreementError, export_repository, parse_formats
from model.hiera import BuiltModel


def test_int8_brings_its_fp32_source_along() -> None:
    assert parse_formats("onnx_int8") == ("onnx", "onnx_int8")
    assert parse_formats(["onnx_int8", "torchscript"]) == ("onnx", "torchscript", "onnx_int8")


def test_packaged_photos_are_preprocessed_like_timm(micro_model: BuiltModel) -> None:
    photos = calibration_photos()
    assert len(photos) == 8
    v = micro_model.variant
    transform = timm.data.create_transform(
        input_size=(3, *v.input_size),
        interpolation=v.interpolation,
        mean=v.mean,
        std=v.std,
        crop_pct=v.crop_pct,
        crop_mode=v.crop_mode,
    )
    expected = np.stack(
        [transform(Image.open(p).convert("RGB")).numpy() for p in photos]  # type: ignore[union-attr]
    )
    np.testing.assert_allclose(eval_batch(photos, v), expected, atol=1e-5)


def test_calibration_dir_is_read_and_an_empty_one_refused(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    assert calibration_photos(tmp_path) == [tmp_path / "red.png"]
    (tmp_path / "red.png").unlink()
    with pytest.raises(ValueError, match=r"no \.jpg/\.jpeg/\.png photos"):
        calibration_photos(tmp_path)


def test_int8_export_records_agreement_measured_on_real_photos(
    micro_model: BuiltModel, tmp_path: Path
) -> None:
    target = export_repository(micro_model, tmp_path, formats=("onnx_int8",))
    repo = ModelRepository.load(target)  # verifies the int8 file's checksum too
    art = repo.manifest.artifacts["onnx_int8"]
    assert art.file == "model.int8.onnx" and art.precision == "int8" and art.parity is None
    assert art.bytes < repo.manifest.artifacts["onnx"].bytes  # int8 weights
    figures = art.agreement
    assert figures is not None and figures.passed and figures.photos == 8
    assert figures.weights_random and figures.min_cosine_bound == 0.999
    # Recompute independently: eager fp32 vs an ORT session on the int8 file.
    batch = eval_batch(calibration_photos(), micro_model.variant)
    with torch.inference_mode():
        _, ref = micro_model.module(torch.from_numpy(batch))
    session = ort.InferenceSession(str(target / art.file), providers=["CPUExecutionProvider"])
    _, emb = session.run(None, {"images": batch})
    ref64, emb64 = ref.numpy().astype(np.float64), np.asarray(emb, np.float64)
    cos = (ref64 * emb64).sum(1) / np.linalg.norm(ref64, axis=1) / np.linalg.norm(emb64, axis=1)
    assert figures.embedding_min_cosine == pytest.approx(cos.min(), abs=1e-6)
    assert figures.embedding_mean_cosine == pytest.approx(cos.mean(), abs=1e-6)
    assert 0.999 <= cos.min() < 1.0  # quantized: close, but not bit-identical
    ops = {node.op_type for node in onnx.load(str(target / art.file)).graph.node}
    assert "MatMulInteger" in ops and "ConvInteger" not in ops  # the patch embedding stays fp32
    assert art.details["op_types"] == ["MatMul"]


def test_int8_under_the_bound_refuses_to_export(
    micro_model: BuiltModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agreement, "MIN_COSINE", 1.01)  # nothing reaches a cosine above 1
    with pytest.raises(AgreementError, match="refusing to export it"):
        export_repository(micro_model, tmp_path, formats=("onnx_int8",))
    assert list(tmp_path.iterdir()) == []


def test_measure_agreement_counts_top1_and_top5() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 10)).astype(np.float32)
    emb = rng.standard_normal((4, 6)).astype(np.float32)
    moved = logits.copy()
    moved[0, logits[0].argmax()] -= 100.0  # row 0: top-1 lost, and it leaves the top 5
    noisy = emb.copy()
    noisy[1] = -emb[1]  # row 1: embedding points the other way (cosine -1)
    figures = measure_agreement(
        lambda _b: (logits, emb),
        lambda _b: (moved, noisy),
        np.zeros((4, 3, 2, 2), np.float32),
        source="test",
        weights_random=True,
    )
    assert figures.top1_agreement == 0.75
    assert figures.top5_overlap == pytest.approx((4 / 5 + 3) / 4)
    assert figures.embedding_min_cosine == pytest.approx(-1.0)
    assert figures.embedding_mean_cosine == pytest.approx(0.5)
    assert not figures.passed


def test_export_records_bf16_autocast_agreement_per_torch_backend(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    manifest = ModelRepository.load(micro_repository).manifest
    assert set(manifest.autocast) == {"eager:bf16", "torchscript:bf16"}
    photos = calibration_photos()
    # Recompute without the code under test's runners: fp32 vs bf16 autocast, eager module.
    batch = torch.from_numpy(eval_batch(photos, micro_model.variant))
    with torch.inference_mode():
        _, fp32 = micro_model.module(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, bf16 = micro_model.module(batch)
    cos = torch.nn.functional.cosine_similarity(fp32.double(), bf16.double()).numpy()
    eager = manifest.autocast["eager:bf16"]
    assert eager.photos == len(photos) == 8 and eager.passed
    assert eager.embedding_min_cosine == pytest.approx(float(cos.min()), abs=1e-6)
    assert eager.embedding_min_cosine < 1.0  # bf16 really ran: the answers moved
    traced = manifest.autocast["torchscript:bf16"]
    assert traced.passed and traced.embedding_min_cosine < 1.0
    # The traced graph autocasts with its own casts: not the same numbers as eager.
    assert traced.embedding_mean_cosine != eager.embedding_mean_cosine


def test_bf16_under_the_bound_is_recorded_not_fatal(
    micro_model: BuiltModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agreement, "MIN_COSINE", 1.01)  # nothing reaches a cosine above 1
    target = export_repository(micro_model, tmp_path, formats=("onnx",))
    figures = ModelRepository.load(target).manifest.autocast
    assert set(figures) == {"eager:bf16"}  # no TorchScript artifact, no TorchScript figures
    assert figures["eager:bf16"].passed is False
    assert figures["eager:bf16"].min_cosine_bound == 1.01
