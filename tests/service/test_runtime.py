"""Tests for the runtime layer: devices, ONNX providers, backends, the loader and the pool."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import pytest
import torch

import service.runtime.loader as loader
import service.runtime.onnx as onnx_module
from model.artifacts import ManifestMismatch, RepositoryError, VariantRecord
from model.hiera import BuiltModel, build
from model.variants import Variant
from service.postprocess import BatchOutputs
from service.runtime.base import BackendError
from service.runtime.devices import resolve_devices
from service.runtime.loader import _rebuild, export_on_the_fly, open_repository, plan
from service.runtime.onnx import OnnxBackend, choose_providers
from service.runtime.pool import InputSpec, RuntimePool
from service.runtime.torch_backends import TorchBackend, load_torchscript
from service.settings import Settings

pytestmark = pytest.mark.timeout(60)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ALL_PROVIDERS = [CUDA, TRT, CPU]  # deliberately not in priority order

EMBED_DIM = 128
NUM_CLASSES = 1000
SIZE = 224


def random_batch(batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


def eager_outputs(model: BuiltModel, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        logits, embedding = model.module(torch.from_numpy(batch.copy()))
    return logits.numpy(), embedding.numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 2])
def test_cpu_device_is_cpu_whatever_the_gpu_count(count: int) -> None:
    assert resolve_devices("cpu", cuda_count=count) == ["cpu"]


def test_auto_without_gpus_falls_back_to_cpu() -> None:
    assert resolve_devices("auto", cuda_count=0) == ["cpu"]


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_auto_and_cuda_use_every_visible_gpu(device: str) -> None:
    assert resolve_devices(device, cuda_count=2) == ["cuda:0", "cuda:1"]  # type: ignore[arg-type]


def test_cuda_with_one_gpu() -> None:
    assert resolve_devices("cuda", cuda_count=1) == ["cuda:0"]


def test_cuda_without_gpus_raises_with_a_hint() -> None:
    with pytest.raises(BackendError) as info:
        resolve_devices("cuda", cuda_count=0)

    message = str(info.value)
    assert "no CUDA device" in message
    assert "--device auto" in message
    assert "CUDA_VISIBLE_DEVICES" in message


def test_resolve_devices_counts_real_gpus_when_not_told() -> None:
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = resolve_devices("auto")

    assert devices == (["cpu"] if expected == 0 else [f"cuda:{i}" for i in range(expected)])


# --- ONNX Runtime providers -------------------------------------------------------------------


def test_cpu_drops_gpu_providers() -> None:
    assert choose_providers("cpu", ALL_PROVIDERS) == [CPU]


def test_cpu_drops_requested_gpu_providers() -> None:
    assert choose_providers("cpu", ALL_PROVIDERS, [TRT, CUDA, CPU]) == [CPU]


def test_cuda_with_only_cpu_available_names_onnxruntime_gpu() -> None:
    with pytest.raises(BackendError) as info:
        choose_providers("cuda:0", [CPU])

    message = str(info.value)
    assert "onnxruntime-gpu" in message
    assert "cuda:0" in message


def test_cuda_with_only_cpu_requested_is_rejected() -> None:
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        choose_providers("cuda:0", ALL_PROVIDERS, [CPU])


def test_requested_unavailable_provider_is_rejected_by_name() -> None:
    with pytest.raises(BackendError) as info:
        choose_providers("cpu", [CPU], ["OpenVINOExecutionProvider", CPU])

    message = str(info.value)
    assert "OpenVINOExecutionProvider" in message
    assert "not available" in message


def test_requested_gpu_provider_missing_on_cuda_is_rejected() -> None:
    with pytest.raises(BackendError, match=TRT):
        choose_providers("cuda:0", [CUDA, CPU], [TRT, CUDA])


def test_cpu_is_appended_as_fallback_to_requested_gpu_providers() -> None:
    assert choose_providers("cuda:0", ALL_PROVIDERS, [CUDA]) == [CUDA, CPU]


def test_tensorrt_comes_before_cuda_when_both_are_available() -> None:
    assert choose_providers("cuda:1", ALL_PROVIDERS) == [TRT, CUDA, CPU]


def test_cuda_alone_is_chosen_when_tensorrt_is_absent() -> None:
    assert choose_providers("cuda:0", [CUDA, CPU]) == [CUDA, CPU]


def test_requested_order_is_kept() -> None:
    assert choose_providers("cuda:0", ALL_PROVIDERS, [CUDA, TRT]) == [CUDA, TRT, CPU]


def test_choose_providers_does_not_modify_the_requested_list() -> None:
    requested = [CUDA]

    choose_providers("cuda:0", ALL_PROVIDERS, requested)

    assert requested == [CUDA]


def test_providers_ignore_unrelated_available_ones() -> None:
    assert choose_providers("cpu", ["AzureExecutionProvider", CPU]) == [CPU]


# --- backends: parity with eager PyTorch on the micro repository ------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_fp32_matches_eager(
    micro_repository: Path, micro_model: BuiltModel, batch_size: int
) -> None:
    batch = random_batch(batch_size, seed=batch_size)
    ref_logits, ref_embedding = eager_outputs(micro_model, batch)
    backend = OnnxBackend(micro_repository / "model.onnx", device="cpu", precision="fp32")

    logits, embedding = backend.infer(batch)
    backend.close()

    assert backend.providers == [CPU]
    assert (backend.name, backend.device, backend.precision) == ("onnx", "cpu", "fp32")
    assert logits.shape == (batch_size, NUM_CLASSES)
    assert embedding.shape == (batch_size, EMBED_DIM)
    assert logits.dtype == embedding.dtype == np.float32
    assert np.abs(ref_logits).max() > 1e-2  # the head is not zero: the comparison means something
    np.testing.assert_allclose(embedding, ref_embedding, rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_torchscript_matches_eager(
    micro_repository: Path, micro_model: BuiltModel, batch_size: int
) -> None:
    batch = random_batch(batch_size, seed=10 + batch_size)
    ref_logits, ref_embedding = eager_outputs(micro_model, batch)
    backend = load_torchscript(micro_repository / "model.ts", device="cpu", precision="fp32")

    logits, embedding = backend.infer(batch)
    backend.close()

    assert (backend.name, backend.device, backend.precision) == ("torchscript", "cpu", "fp32")
    assert logits.shape == (batch_size, NUM_CLASSES)
    assert embedding.shape == (batch_size, EMBED_DIM)
    assert logits.dtype == embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, ref_embedding, rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eager_torch_backend_matches_eager(micro_model: BuiltModel, batch_size: int) -> None:
    batch = random_batch(batch_size, seed=20 + batch_size)
    ref_logits, ref_embedding = eager_outputs(micro_model, batch)
    backend = TorchBackend(
        copy.deepcopy(micro_model.module), name="eager", device="cpu", precision="fp32"
    )

    logits, embedding = backend.infer(batch)

    assert (backend.name, backend.device, backend.precision) == ("eager", "cpu", "fp32")
    assert logits.dtype == embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, ref_embedding, rtol=0, atol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_fp16_artifact_is_fed_float16_and_returns_float32(
    micro_repository: Path, micro_model: BuiltModel, batch_size: int
) -> None:
    path = micro_repository / "model.fp16.onnx"
    session = ort.InferenceSession(str(path), providers=[CPU])
    assert session.get_inputs()[0].type == "tensor(float16)"  # the cast is really needed
    batch = random_batch(batch_size, seed=30 + batch_size)
    ref_logits, ref_embedding = eager_outputs(micro_model, batch)
    backend = OnnxBackend(path, device="cpu", precision="fp16")

    logits, embedding = backend.infer(batch)

    assert logits.dtype == embedding.dtype == np.float32
    assert logits.shape == (batch_size, NUM_CLASSES)
    assert embedding.shape == (batch_size, EMBED_DIM)
    np.testing.assert_allclose(embedding, ref_embedding, rtol=0, atol=2e-2)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-2)


def test_onnx_backend_does_not_modify_the_input_batch(micro_repository: Path) -> None:
    batch = random_batch(2, seed=40)
    original = batch.copy()
    backend = OnnxBackend(micro_repository / "model.fp16.onnx", device="cpu", precision="fp16")

    backend.infer(batch)

    assert batch.dtype == np.float32
    np.testing.assert_array_equal(batch, original)


def test_torch_bf16_on_cpu_is_close_to_fp32(micro_model: BuiltModel) -> None:
    batch = random_batch(2, seed=50)
    _, ref_embedding = eager_outputs(micro_model, batch)
    backend = TorchBackend(
        copy.deepcopy(micro_model.module), name="eager", device="cpu", precision="bf16"
    )

    logits, embedding = backend.infer(batch)

    assert logits.dtype == embedding.dtype == np.float32
    assert logits.shape == (2, NUM_CLASSES)
    assert np.all(np.isfinite(embedding))
    assert np.all(cosine(embedding, ref_embedding) > 0.99)
    assert not np.array_equal(embedding, ref_embedding)  # autocast really ran in bf16


def test_torch_fp16_on_cpu_is_rejected(micro_model: BuiltModel) -> None:
    with pytest.raises(BackendError, match="fp16"):
        TorchBackend(micro_model.module, name="eager", device="cpu", precision="fp16")


def test_onnx_backend_with_unavailable_provider_raises(micro_repository: Path) -> None:
    with pytest.raises(BackendError, match="NoSuchExecutionProvider"):
        OnnxBackend(
            micro_repository / "model.onnx",
            device="cpu",
            precision="fp32",
            providers=["NoSuchExecutionProvider"],
        )


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="needs a CPU-only ORT build")
def test_onnx_backend_on_cuda_with_cpu_only_ort_names_the_gpu_package(
    micro_repository: Path,
) -> None:
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        OnnxBackend(micro_repository / "model.onnx", device="cuda:0", precision="fp32")


def test_onnx_backend_on_a_corrupt_file_raises_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not an onnx graph")

    with pytest.raises(BackendError, match="could not load"):
        OnnxBackend(path, device="cpu", precision="fp32")


def test_load_torchscript_on_a_corrupt_file_raises_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "model.ts"
    path.write_bytes(b"not a torchscript archive")

    with pytest.raises(BackendError, match="cannot load TorchScript"):
        load_torchscript(path, device="cpu", precision="fp32")


# --- loader -----------------------------------------------------------------------------------


def test_plan_from_repository_describes_the_model_and_builds_working_instances(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    settings = Settings(
        model_repository=micro_repository, backend="onnx", instances_per_device=2, device="cpu"
    )

    load_plan = plan(settings)

    card = load_plan.card
    assert card.embed_dim == EMBED_DIM
    assert card.num_classes == NUM_CLASSES
    assert len(card.labels) == NUM_CLASSES
    assert card.random_weights
    assert card.weights_kind == "random"
    assert card.weights_sha256 == micro_model.weights.state_sha256
    assert card.variant == "hiera_micro"
    assert card.preprocessing.input_size == (SIZE, SIZE)
    assert card.repository == str(micro_repository)
    assert [device for device, _ in load_plan.instances] == ["cpu", "cpu"]

    batch = random_batch(1, seed=60)
    ref_logits, ref_embedding = eager_outputs(micro_model, batch)
    backends = [factory() for _, factory in load_plan.instances]
    assert backends[0] is not backends[1]
    for backend in backends:
        assert (backend.name, backend.device, backend.precision) == ("onnx", "cpu", "fp32")
        logits, embedding = backend.infer(batch)
        np.testing.assert_allclose(embedding, ref_embedding, rtol=0, atol=1e-4)
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
        backend.close()


def test_plan_with_repository_root_resolves_the_single_model(micro_repository: Path) -> None:
    settings = Settings(
        model_repository=micro_repository.parent, device="cpu", adaptive_layout=False
    )
    load_plan = plan(settings)

    assert load_plan.card.repository == str(micro_repository)
    assert len(load_plan.instances) == 1


def recording_onnx_backend(paths: list[Path]) -> type[OnnxBackend]:
    """The real backend class, remembering which file each instance was created from."""

    class RecordingOnnxBackend(OnnxBackend):
        def __init__(self, path: Path, **kwargs: object) -> None:
            paths.append(path)
            super().__init__(path, **kwargs)  # type: ignore[arg-type]

    return RecordingOnnxBackend


@pytest.mark.parametrize(
    ("precision", "artifact"), [("fp32", "model.onnx"), ("fp16", "model.fp16.onnx")]
)
def test_onnx_plan_picks_the_artifact_for_the_precision(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch, precision: str, artifact: str
) -> None:
    created_from: list[Path] = []
    monkeypatch.setattr(onnx_module, "OnnxBackend", recording_onnx_backend(created_from))
    settings = Settings(
        model_repository=micro_repository, backend="onnx", precision=precision, device="cpu"
    )

    (_, factory), *_ = plan(settings).instances
    backend = factory()

    assert created_from == [micro_repository / artifact]
    assert backend.precision == precision
    logits, embedding = backend.infer(random_batch(1))
    assert logits.dtype == embedding.dtype == np.float32


@pytest.mark.parametrize(("spinning", "entry"), [(False, "0"), (True, "1")])
def test_onnx_sessions_spin_only_when_asked(
    micro_repository: Path, spinning: bool, entry: str
) -> None:
    settings = Settings(
        model_repository=micro_repository, device="cpu", intra_op_threads=2,
        intra_op_spinning=spinning,
    )  # fmt: skip
    (_, factory), *_ = plan(settings).instances
    session = factory()._session  # type: ignore[attr-defined]
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry
    assert options.intra_op_num_threads == 2


def test_torchscript_plan_uses_model_ts(
    micro_repository: Path, micro_model: BuiltModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.runtime.torch_backends as torch_backends

    loaded: list[Path] = []

    def recording_load(path: Path, *, device: str, precision: str) -> TorchBackend:
        loaded.append(path)
        return load_torchscript(path, device=device, precision=precision)

    monkeypatch.setattr(torch_backends, "load_torchscript", recording_load)
    settings = Settings(model_repository=micro_repository, backend="torchscript", device="cpu")

    (_, factory), *_ = plan(settings).instances
    backend = factory()

    assert loaded == [micro_repository / "model.ts"]
    assert backend.name == "torchscript"
    batch = random_batch(1, seed=70)
    _, ref_embedding = eager_outputs(micro_model, batch)
    _, embedding = backend.infer(batch)
    np.testing.assert_allclose(embedding, ref_embedding, rtol=0, atol=1e-4)


def test_plan_builds_one_instance_per_device_and_count(micro_repository: Path) -> None:
    settings = Settings(model_repository=micro_repository, instances_per_device=3, device="cpu")

    assert [device for device, _ in plan(settings).instances] == ["cpu"] * 3


def _threads(factory: Callable[[], Any]) -> int:
    backend = factory()
    try:
        return int(backend._session.get_session_options().intra_op_num_threads)
    finally:
        backend.close()


@pytest.mark.parametrize(("cores", "side_by_side", "each"), [(2, 2, 1), (3, 3, 1), (10, 4, 2)])
def test_plan_adaptive_layout_splits_the_cores_and_keeps_a_solo_instance_on_all(
    micro_repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    side_by_side: int,
    each: int,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))

    load_plan = plan(Settings(model_repository=micro_repository, device="cpu"))

    assert [device for device, _ in load_plan.instances] == ["cpu"] * side_by_side
    assert {_threads(factory) for _, factory in load_plan.instances} == {each}
    assert load_plan.solo is not None
    assert load_plan.solo[0] == "cpu"
    assert _threads(load_plan.solo[1]) == 0  # the runtime's default: every core


@pytest.mark.parametrize(
    "change",
    [
        {"adaptive_layout": False},
        {"instances_per_device": 2},  # an explicit layout is kept as given
        {"intra_op_threads": 2},
        {"backend": "torchscript"},  # torch's threads are process-wide
    ],
)
def test_plan_adaptive_layout_only_replaces_the_default_onnx_cpu_layout(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any]
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    settings = Settings(model_repository=micro_repository, device="cpu", **change)

    load_plan = plan(settings)

    assert load_plan.solo is None
    assert len(load_plan.instances) == change.get("instances_per_device", 1)


def test_plan_adaptive_layout_stays_off_when_the_copies_would_not_fit_in_memory(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    size = (micro_repository / "model.onnx").stat().st_size
    settings = Settings(model_repository=micro_repository, device="cpu")
    # Two more sessions need about 2 x 2.5 x the artifact; half the free memory must hold it.
    monkeypatch.setattr(loader, "available_memory", lambda: int(2 * 5 * size) + 1024)
    assert plan(settings).solo is not None
    monkeypatch.setattr(loader, "available_memory", lambda: int(2 * 5 * size) - 1024)
    with caplog.at_level("WARNING", logger="service.runtime.loader"):
        load_plan = plan(settings)
    assert load_plan.solo is None and len(load_plan.instances) == 1
    assert "adaptive CPU layout off: 2 more sessions of model.onnx" in caplog.text
    monkeypatch.setattr(loader, "available_memory", lambda: None)  # unknown: not a reason
    assert plan(settings).solo is not None


def test_available_memory_reads_the_cgroup_limit_and_the_host(tmp_path: Path) -> None:
    cgroup, meminfo = tmp_path / "cgroup", tmp_path / "meminfo"
    cgroup.mkdir()
    meminfo.write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("1000\n")
    assert loader.available_memory(cgroup, meminfo) == 20_000_000 * 1024  # no cgroup limit
    (cgroup / "memory.max").write_text(f"{4 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    assert loader.available_memory(cgroup, meminfo) == 3 * 2**30  # the tighter of the two
    assert loader.available_memory(tmp_path / "none", tmp_path / "none") is None


def test_plan_adaptive_layout_needs_two_cores(
    micro_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})

    load_plan = plan(Settings(model_repository=micro_repository, device="cpu"))

    assert load_plan.solo is None and len(load_plan.instances) == 1


def test_open_repository_on_the_model_folder(micro_repository: Path) -> None:
    repo = open_repository(micro_repository)

    assert repo.path == micro_repository
    assert len(repo.labels) == NUM_CLASSES


def test_open_repository_on_the_parent_resolves_the_single_model(micro_repository: Path) -> None:
    repo = open_repository(micro_repository.parent)

    assert repo.path == micro_repository
    assert repo.manifest.embed_dim == EMBED_DIM


def copy_model(source: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(source, target)
    return target


def test_open_repository_with_two_models_names_both(micro_repository: Path, tmp_path: Path) -> None:
    copy_model(micro_repository, tmp_path, "model_a")
    copy_model(micro_repository, tmp_path, "model_b")

    with pytest.raises(RepositoryError) as info:
        open_repository(tmp_path)

    message = str(info.value)
    assert "model_a" in message
    assert "model_b" in message
    assert "several models" in message


def test_open_repository_on_an_empty_folder_says_to_run_hiera_export(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError) as info:
        open_repository(tmp_path)

    message = str(info.value)
    assert "hiera-export" in message
    assert str(tmp_path) in message


def test_open_repository_on_a_missing_folder_says_to_run_hiera_export(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="hiera-export"):
        open_repository(tmp_path / "does-not-exist")


def test_open_repository_refuses_a_tampered_artifact(
    micro_repository: Path, tmp_path: Path
) -> None:
    model = copy_model(micro_repository, tmp_path, "tampered")
    with (model / "model.onnx").open("ab") as file:
        file.write(b"\0")

    with pytest.raises(RepositoryError, match="checksum"):
        open_repository(model)


def with_manifest_changes(
    source: Path, root: Path, change: Callable[[dict[str, object]], None]
) -> Path:
    """Copy a model folder and edit its manifest (not covered by the manifest's checksums)."""
    model = copy_model(source, root, source.name)
    manifest_file = model / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    change(manifest)
    manifest_file.write_text(json.dumps(manifest))
    return model


def alter_state_sha(manifest: dict[str, object]) -> None:
    weights = manifest["weights"]
    assert isinstance(weights, dict)
    weights["state_sha256"] = "0" * 64


def test_eager_plan_from_custom_variant_repository_rebuilds_the_same_model(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    settings = Settings(model_repository=micro_repository, backend="eager", device="cpu")

    load_plan = plan(settings)

    assert load_plan.card.weights_sha256 == micro_model.weights.state_sha256
    rebuilt = _rebuild(open_repository(micro_repository).manifest, seed=0)
    assert rebuilt.weights.state_sha256 == micro_model.weights.state_sha256
    (_, factory), *_ = load_plan.instances
    backend = factory()
    assert backend.name == "eager"
    batch = random_batch(1, seed=80)
    _, ref_embedding = eager_outputs(micro_model, batch)
    _, embedding = backend.infer(batch)
    np.testing.assert_allclose(embedding, ref_embedding, rtol=0, atol=1e-4)


def test_eager_plan_from_custom_variant_repository_refuses_different_weights(
    micro_repository: Path, micro_variant: Variant, tmp_path: Path
) -> None:
    # weights.source is the one weights field not sealed in the artifacts (a checkpoint may
    # move): point it at other weights, and the rebuild's state sha256 gives them away.
    other = tmp_path / "other.pth"
    torch.save(build(micro_variant, "random", seed=1).module.backbone.state_dict(), other)

    def change(manifest: dict[str, object]) -> None:
        manifest["weights"]["source"] = str(other)  # type: ignore[index]

    model = with_manifest_changes(micro_repository, tmp_path, change)
    settings = Settings(model_repository=model, backend="eager", device="cpu")

    with pytest.raises(BackendError, match="differ"):
        plan(settings)


def test_eager_plan_refuses_an_edited_weights_sha_at_load(
    micro_repository: Path, tmp_path: Path
) -> None:
    model = with_manifest_changes(micro_repository, tmp_path, alter_state_sha)
    settings = Settings(model_repository=model, backend="eager", device="cpu")

    with pytest.raises(ManifestMismatch, match=f'weights.state_sha256 is "{"0" * 64}"'):
        plan(settings)


@pytest.fixture(scope="module")
def tiny_random() -> BuiltModel:
    return build("hiera_tiny_224", "random", seed=0)


def catalogue_manifest_record(micro_repository: Path) -> dict[str, object]:
    """Micro's manifest as JSON, re-pointed at the catalogue's hiera_tiny_224 (no kwargs)."""
    manifest = json.loads((micro_repository / "manifest.json").read_text())
    manifest["variant"] = VariantRecord(
        name="hiera_tiny_224", timm_name="hiera_tiny_224", pretrained_tag="mae_in1k_ft_in1k"
    ).model_dump()
    return manifest


def test_rebuild_of_a_catalogue_variant_matches_and_uses_the_manifest_seed(
    micro_repository: Path, tiny_random: BuiltModel
) -> None:
    record = catalogue_manifest_record(micro_repository)
    record["weights"]["state_sha256"] = tiny_random.weights.state_sha256  # type: ignore[index]
    manifest = open_repository(micro_repository).manifest.model_validate(record)

    rebuilt = _rebuild(manifest, seed=123)  # the manifest's seed (0) wins over the fallback

    assert rebuilt.weights.state_sha256 == tiny_random.weights.state_sha256
    assert rebuilt.weights.kind == "random"
    assert rebuilt.variant.name == "hiera_tiny_224"


def test_rebuild_refuses_weights_that_differ_from_the_manifest(micro_repository: Path) -> None:
    record = catalogue_manifest_record(micro_repository)
    alter_state_sha(record)
    manifest = open_repository(micro_repository).manifest.model_validate(record)

    with pytest.raises(BackendError, match="differ"):
        _rebuild(manifest, seed=0)


def test_eager_plan_from_weights_builds_directly(tiny_random: BuiltModel) -> None:
    settings = Settings(
        weights="random", variant="hiera_tiny_224", backend="eager", device="cpu", seed=0
    )

    load_plan = plan(settings)

    card = load_plan.card
    assert card.repository is None
    assert card.random_weights
    assert card.weights_sha256 == tiny_random.weights.state_sha256
    assert card.num_classes == len(card.labels) == 1000
    assert card.embed_dim == tiny_random.variant.embed_dim
    assert [device for device, _ in load_plan.instances] == ["cpu"]


@pytest.mark.slow
def test_export_on_the_fly_exports_once_and_then_reuses(tmp_path: Path) -> None:
    settings = Settings(
        weights="random", variant="hiera_tiny_224", export_dir=tmp_path, backend="onnx"
    )

    first, built = export_on_the_fly(settings)
    onnx_file = first.artifact_path("onnx")
    before = onnx_file.stat()
    second, _ = export_on_the_fly(settings)
    after = second.artifact_path("onnx").stat()

    assert first.path == second.path == tmp_path / "hiera_tiny_224"
    assert onnx_file == second.artifact_path("onnx")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert second.manifest.weights.state_sha256 == built.weights.state_sha256
    assert second.manifest.created_at == first.manifest.created_at

    # Another backend with the same weights adds its artifact and keeps the existing one,
    # so a server already using model.onnx is not left without it.
    third, _ = export_on_the_fly(settings.model_copy(update={"backend": "torchscript"}))
    assert sorted(third.manifest.artifacts) == ["onnx", "torchscript"]
    assert third.artifact_path("onnx").is_file() and third.artifact_path("torchscript").is_file()

    # Different weights replace the export whole.
    fourth, _ = export_on_the_fly(settings.model_copy(update={"seed": 1}))
    assert sorted(fourth.manifest.artifacts) == ["onnx"]
    assert fourth.manifest.weights.seed == 1


# --- pool, with fake backends -----------------------------------------------------------------

SAMPLE = np.arange(3 * 3 * 3, dtype=np.float32).reshape(3, 3, 3)  # one tiny [C, H, W] "image"
# Pool inputs: SAMPLE-shaped crops, normalised with ImageNet's statistics.
INPUTS = InputSpec((3, 3, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
WAIT = 5.0  # seconds any cross-thread wait may take before the test fails


class FakeBackend:
    """Records (thread name, batch size) per call and returns arrays derived from the batch."""

    name = "fake"
    precision = "fp32"

    def __init__(self, device: str, tag: float) -> None:
        self.device = device
        self.tag = tag
        self.created_on = threading.current_thread().name
        self.calls: list[tuple[str, int]] = []
        self.closed = 0
        self.block = False  # when set, infer waits for `release` after signalling `entered`
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_with: Exception | None = None

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((threading.current_thread().name, batch.shape[0]))
        if self.fail_with is not None:
            raise self.fail_with
        if self.block:
            self.entered.set()
            if not self.release.wait(WAIT):
                raise TimeoutError("the test never released this call")
        flat = batch.reshape(batch.shape[0], -1)
        return flat[:, :4] + self.tag, flat.sum(axis=1, keepdims=True)

    def close(self) -> None:
        self.closed += 1


class Factories:
    """Backend factories that remember what they built."""

    def __init__(self) -> None:
        self.built: list[FakeBackend] = []

    def make(self, device: str) -> Callable[[], FakeBackend]:
        def factory() -> FakeBackend:
            backend = FakeBackend(device, tag=100.0 * len(self.built))
            self.built.append(backend)
            return backend

        return factory

    def failing(self, error: Exception) -> Callable[[], FakeBackend]:
        def factory() -> FakeBackend:
            raise error

        return factory


async def test_start_warms_every_instance_at_every_batch_size() -> None:
    factories = Factories()
    specs = [("cpu", factories.make("cpu")), ("cpu", factories.make("cpu"))]

    pool = await RuntimePool.start(specs, inputs=INPUTS, max_batch_size=4)
    try:
        assert pool.size == 2
        assert [i.device for i in pool.instances] == ["cpu", "cpu"]
        assert [i.backend for i in pool.instances] == factories.built
        for backend in factories.built:
            assert [size for _, size in backend.calls] == [1, 2, 3, 4]
        assert all(i.batches == 0 for i in pool.instances)  # warm-up is not counted
    finally:
        await pool.close()


class PreparedBackend(FakeBackend):
    """Records its prepare() and, like a device-postprocessing backend, ranks on request."""

    device_top_k = 2

    def __init__(self, device: str, tag: float) -> None:
        super().__init__(device, tag)
        self.prepared: list[tuple[int, tuple[int, ...]]] = []
        self.logits_asked: list[bool] = []

    def prepare(self, max_batch_size: int, input_shape: tuple[int, ...]) -> None:
        assert not self.calls, "prepared after a warm-up batch"
        self.prepared.append((max_batch_size, input_shape))

    def infer_outputs(self, batch: np.ndarray, *, logits: bool) -> BatchOutputs:
        self.logits_asked.append(logits)
        produced, embedding = self.infer(batch)
        ranked = (np.zeros((len(batch), 2), np.int64), np.zeros((len(batch), 2)))
        return BatchOutputs(produced if logits else None, embedding, ranked=ranked)


async def test_instances_are_prepared_before_their_warm_up_and_postprocess_on_request() -> None:
    backend = PreparedBackend("cpu", tag=0.0)
    pool = await RuntimePool.start([("cpu", lambda: backend)], inputs=INPUTS, max_batch_size=3)
    try:
        assert backend.prepared == [(3, (3, 3, 3))]
        assert [size for _, size in backend.calls] == [1, 2, 3]
        outputs = await pool.infer([SAMPLE, SAMPLE], logits=False)
        assert isinstance(outputs, BatchOutputs) and outputs.logits is None
        assert len(outputs) == 2
        assert backend.logits_asked == [True, True, True, False]  # the warm-up brings all back
    finally:
        await pool.close()


async def test_warm_up_batches_are_normalised_blank_crops_through_the_feeder() -> None:
    seen: list[np.ndarray] = []

    class Capturing(FakeBackend):
        def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            seen.append(batch.copy())
            return super().infer(batch)

    pool = await RuntimePool.start(
        [("cpu", lambda: Capturing("cpu", 0.0))], inputs=INPUTS, max_batch_size=3
    )
    await pool.close()

    assert [b.shape for b in seen] == [(n, *SAMPLE.shape) for n in (1, 2, 3)]
    # A black crop after Normalize: (0 - mean) / std per channel, computed independently.
    black = np.stack(
        [np.full((3, 3), -m / s, np.float32) for m, s in zip(INPUTS.mean, INPUTS.std, strict=True)]
    )
    for batch in seen:
        assert batch.flags.c_contiguous and batch.dtype == np.float32
        np.testing.assert_allclose(batch, np.stack([black] * batch.shape[0]), rtol=1e-6)


async def test_each_instance_always_runs_on_its_own_single_thread() -> None:
    factories = Factories()
    specs = [("cpu", factories.make("cpu")) for _ in range(3)]
    pool = await RuntimePool.start(specs, inputs=INPUTS, max_batch_size=2)
    try:
        batches = [[SAMPLE + k] * (1 + k % 2) for k in range(12)]
        await asyncio.gather(*(pool.infer(b) for b in batches))
    finally:
        await pool.close()

    threads = []
    for index, backend in enumerate(factories.built):
        names = {name for name, _ in backend.calls}
        assert len(names) == 1, f"instance {index} ran on several threads: {names}"
        (name,) = names
        assert name.startswith(f"hiera-infer-{index}")
        assert backend.created_on == name  # built on the thread that later runs it
        threads.append(name)
    assert len(set(threads)) == 3
    assert sum(len(b.calls) for b in factories.built) == 3 * 2 + 12
    assert sum(i.batches for i in pool.instances) == 12


async def test_infer_returns_the_backends_result_for_that_batch() -> None:
    factories = Factories()
    pool = await RuntimePool.start(
        [("cpu", factories.make("cpu"))], inputs=INPUTS, max_batch_size=1
    )
    try:
        logits, embedding = await pool.infer([SAMPLE, SAMPLE * 2])
        batch = np.stack([SAMPLE, SAMPLE * 2])
    finally:
        await pool.close()

    np.testing.assert_array_equal(logits, batch.reshape(2, -1)[:, :4])
    np.testing.assert_array_equal(embedding, batch.reshape(2, -1).sum(axis=1, keepdims=True))
    assert pool.instances[0].batches == 1


async def test_solo_instance_takes_a_batch_that_comes_alone_and_never_runs_beside_another() -> None:
    factories = Factories()
    specs = [("cpu", factories.make("cpu")), ("cpu", factories.make("cpu"))]
    pool = await RuntimePool.start(
        specs, inputs=INPUTS, max_batch_size=1, solo=("cpu", factories.make("cpu"))
    )
    first, second, solo = factories.built
    waiting = 0
    pool.waiting = lambda: waiting

    def runs(backend: FakeBackend) -> int:
        return len(backend.calls) - 1  # minus the warm-up

    try:
        assert pool.size == 2 and pool.solo is not None and pool.solo.backend is solo
        assert [i.backend for i in pool.all_instances] == [first, second, solo]
        assert solo.calls[0][0].startswith("hiera-infer-2")  # warmed on a thread of its own
        await pool.infer([SAMPLE])  # alone, nothing waiting: every core
        assert (runs(first), runs(second), runs(solo)) == (0, 0, 1)
        waiting = 3  # images queue behind it: side by side, though every instance is idle
        await pool.infer([SAMPLE])
        assert (runs(first), runs(second), runs(solo)) == (1, 0, 1)

        # While one side-by-side batch runs, a batch that comes alone still runs beside it.
        first.block = second.block = True
        waiting = 1
        held = asyncio.create_task(pool.infer([SAMPLE]))
        await _until(lambda: first.entered.is_set() or second.entered.is_set())
        waiting = 0
        lone = asyncio.create_task(pool.infer([SAMPLE]))
        await _until(lambda: first.entered.is_set() and second.entered.is_set())
        assert runs(solo) == 1
        first.release.set()
        second.release.set()
        await asyncio.wait_for(asyncio.gather(held, lone), WAIT)
        assert (runs(first), runs(second), runs(solo)) == (2, 1, 1)

        # While the solo instance runs, nothing runs beside it: the next batch waits for it.
        solo.block = True
        alone = asyncio.create_task(pool.infer([SAMPLE + 1]))
        assert await asyncio.to_thread(solo.entered.wait, WAIT)
        waiting = 1
        behind = asyncio.create_task(pool.infer([SAMPLE + 2]))
        await asyncio.sleep(0.1)
        assert not behind.done() and (runs(first), runs(second)) == (2, 1)
        solo.release.set()
        logits, _ = await asyncio.wait_for(behind, WAIT)
        assert float(logits[0, 0] - 2) in (0.0, 100.0)  # answered by a side-by-side instance
        logits, _ = await asyncio.wait_for(alone, WAIT)
        assert float(logits[0, 0] - 1) == 200.0  # the solo instance's tag
    finally:
        for backend in factories.built:
            backend.release.set()
        await pool.close()
    assert all(backend.closed == 1 for backend in factories.built)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a_cancelled_wait_for_an_instance_gives_nothing_away() -> None:
    factories = Factories()
    pool = await RuntimePool.start(
        [("cpu", factories.make("cpu"))], inputs=INPUTS, max_batch_size=1
    )
    (backend,) = factories.built
    backend.block = True
    try:
        running = asyncio.create_task(pool.infer([SAMPLE]))
        assert await asyncio.to_thread(backend.entered.wait, WAIT)
        waiter = asyncio.create_task(pool.infer([SAMPLE]))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        backend.release.set()
        await asyncio.wait_for(running, WAIT)
        await asyncio.wait_for(pool.infer([SAMPLE]), WAIT)  # the instance came back
    finally:
        backend.release.set()
        await pool.close()
    assert len(backend.calls) == 1 + 2  # warm-up, then the two batches that were not cancelled


async def test_two_concurrent_batches_run_on_two_instances_at_once() -> None:
    factories = Factories()
    specs = [("cpu", factories.make("cpu")), ("cpu", factories.make("cpu"))]
    pool = await RuntimePool.start(specs, inputs=INPUTS, max_batch_size=1)
    first, second = factories.built
    for backend in factories.built:
        backend.block = True
    try:
        tasks = [asyncio.create_task(pool.infer([SAMPLE + k])) for k in (1, 2)]
        # Both calls are inside their backends at the same time: neither has been released.
        for backend in factories.built:
            assert await asyncio.to_thread(backend.entered.wait, WAIT)
        assert not any(task.done() for task in tasks)
        for backend in factories.built:
            backend.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    finally:
        for backend in factories.built:
            backend.release.set()
        await pool.close()

    assert [size for _, size in first.calls[1:]] == [1]
    assert [size for _, size in second.calls[1:]] == [1]
    assert first.calls[-1][0] != second.calls[-1][0]
    tags = sorted(float(logits[0, 0] - k) for (logits, _), k in zip(results, (1, 2), strict=True))
    assert tags == [0.0, 100.0]  # one batch answered by each backend


async def test_a_failing_batch_raises_and_frees_its_instance() -> None:
    factories = Factories()
    pool = await RuntimePool.start(
        [("cpu", factories.make("cpu"))], inputs=INPUTS, max_batch_size=1
    )
    (backend,) = factories.built
    try:
        backend.fail_with = ValueError("bad batch")
        with pytest.raises(ValueError, match="bad batch"):
            await asyncio.wait_for(pool.infer([SAMPLE]), WAIT)
        backend.fail_with = None
        logits, _ = await asyncio.wait_for(pool.infer([SAMPLE]), WAIT)
    finally:
        await pool.close()

    assert logits.shape == (1, 4)


async def test_close_closes_every_backend_and_stops_their_threads() -> None:
    factories = Factories()
    specs = [("cpu", factories.make("cpu")) for _ in range(3)]
    pool = await RuntimePool.start(specs, inputs=INPUTS, max_batch_size=1)

    await pool.close()

    assert [b.closed for b in factories.built] == [1, 1, 1]
    for instance in pool.instances:
        with pytest.raises(RuntimeError, match="shutdown"):
            instance.thread.submit(lambda: None)


async def test_close_continues_when_one_backend_fails_to_close() -> None:
    factories = Factories()
    specs = [("cpu", factories.make("cpu")) for _ in range(2)]
    pool = await RuntimePool.start(specs, inputs=INPUTS, max_batch_size=1)

    def broken_close() -> None:
        raise RuntimeError("driver gone")

    factories.built[0].close = broken_close  # type: ignore[method-assign]
    await pool.close()

    assert factories.built[1].closed == 1


async def test_a_failing_factory_fails_start_and_closes_the_created_instances() -> None:
    factories = Factories()
    specs = [
        ("cpu", factories.make("cpu")),
        ("cpu", factories.make("cpu")),
        ("cpu", factories.failing(BackendError("no such device"))),
        ("cpu", factories.make("cpu")),
    ]

    with pytest.raises(BackendError, match="no such device"):
        await RuntimePool.start(specs, inputs=INPUTS, max_batch_size=2)

    assert len(factories.built) == 2  # the instance after the failure was never created
    assert [b.closed for b in factories.built] == [1, 1]


async def test_a_failing_warm_up_fails_start_and_closes_that_instance_too() -> None:
    class BrokenWarmUp(FakeBackend):
        def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            raise RuntimeError(f"out of memory at batch {batch.shape[0]}")

    factories = Factories()
    broken: list[BrokenWarmUp] = []

    def broken_factory() -> BrokenWarmUp:
        broken.append(BrokenWarmUp("cpu", 0.0))
        return broken[-1]

    specs = [("cpu", factories.make("cpu")), ("cpu", broken_factory)]

    with pytest.raises(RuntimeError, match="out of memory at batch 1"):
        await RuntimePool.start(specs, inputs=INPUTS, max_batch_size=2)

    assert [b.closed for b in factories.built] == [1]
    assert [b.closed for b in broken] == [1]


async def test_start_without_factories_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one instance"):
        await RuntimePool.start([], inputs=INPUTS, max_batch_size=1)


def test_batch_cap_is_the_smallest_size_near_the_best_time_per_image() -> None:
    from service.runtime.pool import RuntimePool

    instance = cast(Any, object())
    gpu_like = RuntimePool([instance], {1: 1.0, 2: 0.55, 4: 0.3, 8: 0.2})
    assert gpu_like.batch_cap(8) == 8  # batching pays all the way
    flat_cpu = RuntimePool([instance], {1: 0.0625, 2: 0.0630, 4: 0.0640, 8: 0.0700})
    assert flat_cpu.batch_cap(8) == 1  # 2 and 4 are within 5% of 1, but 1 is smallest
    knee = RuntimePool([instance], {1: 0.100, 2: 0.060, 4: 0.0500, 8: 0.0490})
    assert knee.batch_cap(8) == 4  # 0.050 <= 0.049 * 1.05; 0.060 is not
    assert RuntimePool([instance]).batch_cap(8) == 8  # not timed: the configured maximum


def test_warm_up_timing_lets_the_sizes_take_turns() -> None:
    # A host that is twice as slow for its first three batches, then fast: timed one size
    # after another, batch 1 would take both its timings in the slow spell and batch 2 one,
    # and batching would seem to pay. Taking turns, every size gets a fast timing.
    from service.runtime.pool import _time_batches

    now = [0.0]
    sizes_run: list[int] = []

    class FlatModel:
        """The same time per image at every batch size: batching buys nothing."""

        def run(self, items: list[Any]) -> None:
            sizes_run.append(len(items))
            slow = 2.0 if len(sizes_run) <= 3 else 1.0
            now[0] += 0.05 * len(items) * slow

    per_image = _time_batches(cast(Any, FlatModel()), (3, 4, 4), 4, clock=lambda: now[0])
    assert sizes_run == [1, 2, 4, 1, 2, 4]
    assert per_image == pytest.approx({1: 0.05, 2: 0.05, 4: 0.05})
    assert RuntimePool([cast(Any, object())], per_image).batch_cap(4) == 1
