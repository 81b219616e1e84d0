"""Turn Settings into a model description plus one backend factory per instance.

Two sources: a model repository written by hiera-export (checksums verified), or a variant
plus weights, exported on the fly into `export_dir` (reused while the weights are unchanged)
or, for the eager backend, built directly.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from model.artifacts import ArtifactKind, Manifest, ModelRepository, RepositoryError
from model.artifacts import Preprocessing as ManifestPreprocessing
from model.hiera import BuiltModel, build
from model.labels import class_names
from model.variants import Variant, custom_variant, get_variant
from service.card import ModelCard
from service.imaging import Preprocessing
from service.runtime.base import Backend, BackendError
from service.runtime.devices import resolve_devices, runtime_gpu_support
from service.settings import Settings, available_cores

if TYPE_CHECKING:
    from service.runtime.torch_backends import GraphFactory

log = logging.getLogger(__name__)

BackendFactory = Callable[[], Backend]


@dataclass
class LoadPlan:
    """The card plus (device, factory) for every instance the pool will start.

    `solo`, in the adaptive CPU layout, is the instance that uses every core and runs only
    when a batch comes alone (service.runtime.pool); `instances` then split the cores.
    """

    card: ModelCard
    instances: list[tuple[str, BackendFactory]]
    solo: tuple[str, BackendFactory] | None = None


def plan(settings: Settings) -> LoadPlan:
    """Resolve what to serve and how; slow (exports, builds), so call it off the event loop."""
    ensure_backend_available(settings)
    devices = resolve_devices(
        settings.device,
        gpu_unusable=runtime_gpu_support(settings.backend, settings.onnx_providers),
    )
    if settings.backend != "onnx":
        import torch

        if settings.intra_op_threads:
            # torch's intra-op pool is process-wide: every torch instance shares this setting.
            torch.set_num_threads(settings.intra_op_threads)
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
    if settings.model_repository is not None:
        repo = open_repository(settings.model_repository)
    elif settings.backend == "eager":
        built = build(settings.variant, settings.weights or "", seed=settings.seed)
        card = _with_autocast(_card_from_built(built), settings, None, built)
        return LoadPlan(card, _eager_instances(built, settings, devices))
    else:
        repo, _ = export_on_the_fly(settings)
    card = _with_autocast(_card_from_manifest(repo), settings, repo, None)
    if settings.backend == "eager":
        built = _rebuild(repo.manifest, settings.seed)
        return LoadPlan(card, _eager_instances(built, settings, devices))
    kind = _artifact_kind(settings)
    artifact = repo.artifact_path(kind)
    record = repo.manifest.artifacts[kind]
    card = replace(
        card,
        artifact=record.file,
        agreement=record.agreement.model_dump() if record.agreement else card.agreement,
    )
    factory_for = _artifact_factory(artifact, settings, card)
    cores = adaptive_cores(settings, devices)
    narrow = min(cores, MAX_SIDE_BY_SIDE)
    if cores and _sessions_fit(artifact, narrow):
        # One core's worth of threads per side-by-side instance, and the solo one with the
        # runtime's default (every core), exactly as the single instance would be without it.
        split = settings.model_copy(update={"intra_op_threads": cores // narrow})
        side_by_side = _replicate(devices, narrow, _artifact_factory(artifact, split, card))
        log.info(
            "adaptive CPU layout: %d instance(s) x %d thread(s) when requests queue, one "
            "instance on all %d cores for a request that comes alone",
            narrow, cores // narrow, cores,
        )  # fmt: skip
        (device,) = devices
        return LoadPlan(card, side_by_side, (device, factory_for(device)))
    return LoadPlan(card, _replicate(devices, settings.instances_per_device, factory_for))


MAX_SIDE_BY_SIDE = 4  # each instance holds its own copy of the weights
# Resident bytes an ONNX Runtime CPU session adds per byte of its artifact (weights, prepacked
# copies, arena): Hiera-T's 110 MB model took 544 MiB more for two sessions, ORT 1.31.
SESSION_MEMORY_FACTOR = 2.5


def _sessions_fit(artifact: Path, extra: int) -> bool:
    """Return whether `extra` more sessions of `artifact` take at most half the free memory."""
    need = extra * SESSION_MEMORY_FACTOR * artifact.stat().st_size
    free = available_memory()
    if free is not None and need > free / 2:
        log.warning(
            "adaptive CPU layout off: %d more sessions of %s would need about %.1f GiB, and "
            "%.1f GiB is free; serving one instance", extra, artifact.name, need / 2**30,
            free / 2**30,
        )  # fmt: skip
        return False
    return True


def available_memory(
    cgroup: Path = Path("/sys/fs/cgroup"), meminfo: Path = Path("/proc/meminfo")
) -> int | None:
    """Bytes this process may still take: its cgroup's limit minus its usage (cgroup v2),
    or the host's MemAvailable, whichever is less; None where neither can be read."""
    free = []
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return min(free) if free else None


def adaptive_cores(settings: Settings, devices: list[str]) -> int:
    """Return the cores the adaptive layout splits, or 0 where it does not apply."""
    default_layout = settings.instances_per_device == 1 and settings.intra_op_threads == 0
    if not (settings.adaptive_layout and default_layout and settings.backend == "onnx"):
        return 0  # torch's intra-op threads are process-wide: one size for every instance
    if devices != ["cpu"]:
        return 0
    cores = available_cores()
    return cores if cores >= 2 else 0


def _with_autocast(
    card: ModelCard, settings: Settings, repo: ModelRepository | None, built: BuiltModel | None
) -> ModelCard:
    """For `--precision bf16`, show its agreement with fp32 on /v1/models, or refuse it.

    A repository carries the figures measured at export; a model built from weights without
    one is measured now, on the packaged photos (two forward passes of 8 images).
    """
    if settings.precision != "bf16":
        return card
    mode = f"{settings.backend}:bf16"
    if repo is not None:
        figures = repo.manifest.autocast.get(mode)
        if figures is None:
            raise RepositoryError(
                f"{repo.path} records no {mode} agreement with fp32 (it was exported before "
                "hiera-export measured it); re-export it to serve --precision bf16"
            )
    else:
        assert built is not None
        from model.export import autocast_agreement
        from model.parity import eager_runner

        log.info("measuring %s agreement with fp32 on the packaged photos", mode)
        figures = autocast_agreement(built, eager_runner(built.module))[mode]
    if not figures.passed:
        raise BackendError(
            f"{mode} embeddings agree with fp32 only down to cosine "
            f"{figures.embedding_min_cosine:.5f} on {figures.photos} photos (bound "
            f"{figures.min_cosine_bound}); refusing to serve it: use --precision fp32"
        )
    return replace(card, agreement=figures.model_dump())


def open_repository(path: Path) -> ModelRepository:
    """Open a model folder, or the single model folder inside a repository root."""
    if (path / "manifest.json").is_file():
        return ModelRepository.load(path)
    candidates = sorted(p for p in path.glob("*/manifest.json")) if path.is_dir() else []
    if len(candidates) == 1:
        return ModelRepository.load(candidates[0].parent)
    if not candidates:
        raise RepositoryError(
            f"{path} holds no model: run `hiera-export --out {path} ...` first, or point "
            "--model-repository at a folder that contains manifest.json"
        )
    names = ", ".join(p.parent.name for p in candidates)
    raise RepositoryError(f"{path} holds several models ({names}); point at one of them")


def export_on_the_fly(settings: Settings) -> tuple[ModelRepository, BuiltModel]:
    """Export variant + weights into export_dir, reusing an export of the same weights."""
    from model.export import export_repository

    built = build(settings.variant, settings.weights or "", seed=settings.seed)
    kind = _artifact_kind(settings)
    target = settings.export_dir / built.variant.name
    formats: set[ArtifactKind] = {kind}
    try:
        existing = ModelRepository.load(target)
        if existing.manifest.weights.state_sha256 == built.weights.state_sha256:
            if kind in existing.manifest.artifacts:
                log.info("reusing export %s (same weights sha256)", target)
                return existing, built
            # Same weights, another backend: keep what is there so servers using the other
            # artifacts still find them after this export replaces the folder.
            formats |= set(existing.manifest.artifacts)
    except RepositoryError:
        pass  # absent, stale or tampered: export afresh below
    log.info("exporting %s (%s) to %s", built.variant.name, ", ".join(sorted(formats)), target)
    path = export_repository(
        built, settings.export_dir, formats=sorted(formats), overwrite=True, on_step=log.info
    )
    return ModelRepository.load(path), built


def _artifact_kind(settings: Settings) -> ArtifactKind:
    if settings.backend == "torchscript":
        return "torchscript"
    if settings.precision == "fp16":
        return "onnx_fp16"
    return "onnx_int8" if settings.precision == "int8" else "onnx"


def _artifact_factory(
    artifact: Path, settings: Settings, card: ModelCard
) -> Callable[[str], BackendFactory]:
    """Return `device -> factory` for instances of `artifact` built as `settings` say."""
    from service.runtime.providers import GpuOptions

    height, width = card.preprocessing.input_size
    gpu = GpuOptions(
        tf32=settings.tf32,
        mem_limit_bytes=settings.gpu_mem_limit_bytes,
        trt_cache_dir=settings.trt_cache_dir,
        trt_fp16=settings.precision == "fp16",
        cuda_graph=settings.onnx_cuda_graphs,
        device_top_k=settings.max_top_k,
        max_batch_size=settings.max_batch_size,
        input_shape=(3, height, width),
    )

    def factory_for(device: str) -> BackendFactory:
        if settings.backend == "torchscript":
            from service.runtime.torch_backends import load_torchscript

            return lambda: load_torchscript(
                artifact,
                device=device,
                precision=settings.precision,
                **torch_gpu_options(settings, device),
            )
        from service.runtime.onnx import OnnxBackend

        # The fp16 artifact is already half precision; the session itself runs as exported.
        return lambda: OnnxBackend(
            artifact,
            device=device,
            precision=settings.precision,
            providers=settings.onnx_providers,
            intra_op_threads=settings.intra_op_threads,
            spinning=settings.intra_op_spinning,
            gpu=gpu,
        )

    return factory_for


def _eager_instances(
    built: BuiltModel, settings: Settings, devices: list[str]
) -> list[tuple[str, BackendFactory]]:
    from service.runtime.torch_backends import TorchBackend

    def factory_for(device: str) -> BackendFactory:
        # Each instance owns its copy: no weights shared across worker threads or devices.
        return lambda: TorchBackend(
            copy.deepcopy(built.module),
            name="eager",
            device=device,
            precision=settings.precision,
            **torch_gpu_options(settings, device),
        )

    return _replicate(devices, settings.instances_per_device, factory_for)


class TorchGpuOptions(TypedDict, total=False):
    """What a torch backend does on a GPU beyond running the module."""

    graphs: GraphFactory | None
    device_top_k: int | None


def torch_gpu_options(settings: Settings, device: str) -> TorchGpuOptions:
    """Return CUDA graphs and device postprocessing for a torch backend on `device` (CUDA
    only: on the CPU a batch runs and is postprocessed as before). Postprocessing ranks the
    most classes a request may ask for (capped at the model's classes on the device)."""
    if not device.startswith("cuda"):
        return {}  # the backends' defaults: no graphs, host postprocessing
    from service.runtime.graphs import CudaGraphs

    return {
        "graphs": CudaGraphs if settings.cuda_graphs else None,
        "device_top_k": settings.max_top_k,
    }


def _replicate(
    devices: list[str], per_device: int, factory_for: Callable[[str], BackendFactory]
) -> list[tuple[str, BackendFactory]]:
    """Return `per_device` instance factories for every device, in device order."""
    return [(device, factory_for(device)) for device in devices for _ in range(per_device)]


def _rebuild(manifest: Manifest, seed: int) -> BuiltModel:
    """Rebuild the eager model a repository was exported from, and prove it is the same."""
    record = manifest.variant
    variant: Variant = (
        custom_variant(record.timm_name, record.name, **record.model_kwargs)
        if record.model_kwargs
        else get_variant(f"{record.timm_name}.{record.pretrained_tag}")
    )
    source = manifest.weights
    weights = "pretrained" if source.kind == "pretrained" else source.source
    built = build(variant, weights, seed=source.seed if source.seed is not None else seed)
    if built.weights.state_sha256 != source.state_sha256:
        raise BackendError(
            f"the eager backend rebuilt {record.name} from {source.source}, but the weights "
            "differ from the ones this repository was exported with; re-export, or serve "
            "with --variant/--weights instead of --model-repository"
        )
    return built


def _card_from_manifest(repo: ModelRepository) -> ModelCard:
    m = repo.manifest
    return ModelCard(
        name=m.name,
        variant=m.variant.name,
        preprocessing=preprocessing_of(m.preprocessing),
        embed_dim=m.embed_dim,
        num_classes=m.num_classes,
        labels=repo.labels,
        weights_source=m.weights.source,
        weights_kind=m.weights.kind,
        weights_sha256=m.weights.state_sha256,
        weights_license=m.weights.license,
        repository=str(repo.path),
    )


def _card_from_built(built: BuiltModel) -> ModelCard:
    v = built.variant
    names, _ = class_names(v)
    return ModelCard(
        name=v.name,
        variant=v.name,
        preprocessing=preprocessing_of(v),
        embed_dim=v.embed_dim,
        num_classes=v.num_classes,
        labels=names,
        weights_source=built.weights.source,
        weights_kind=built.weights.kind,
        weights_sha256=built.weights.state_sha256,
        weights_license="n/a (random init)" if built.weights.is_random else v.license,
        repository=None,
    )


def preprocessing_of(source: Variant | ManifestPreprocessing) -> Preprocessing:
    """Copy the eval-transform fields, which a Variant and a manifest name alike."""
    return Preprocessing(
        input_size=source.input_size,
        mean=source.mean,
        std=source.std,
        interpolation=source.interpolation,
        crop_pct=source.crop_pct,
        crop_mode=source.crop_mode,
    )


def ensure_backend_available(settings: Settings) -> None:
    """Fail fast with an install hint when the chosen runtime is not installed."""
    if settings.backend == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BackendError(
                "the onnx backend needs ONNX Runtime: pip install 'hiera-serve[cpu]' (or [gpu])"
            ) from exc
