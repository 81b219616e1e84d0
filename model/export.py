"""Export a built Hiera to ONNX and TorchScript, check parity, and write a model repository.

ONNX goes through the TorchScript-based exporter (`dynamo=False`): it handles timm's Hiera
as built for serving, while the dynamo exporter rejects the 5-D tensors that mask-unit
attention hands to scaled_dot_product_attention unless the model is rebuilt with
`exportable=True`. TorchScript is traced, because `torch.jit.script` cannot compile Hiera.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path

import torch

from model.artifacts import (
    ARTIFACT_FILES,
    Artifact,
    ArtifactKind,
    Manifest,
    ParityFigures,
    Preprocessing,
    VariantRecord,
    WeightsRecord,
    write_labels,
    write_manifest,
)
from model.checkpoints import sha256_file
from model.hiera import BuiltModel, ServingHiera
from model.labels import class_names
from model.parity import TOLERANCE, Runner, eager_runner, measure, onnx_runner, torchscript_runner

ALL_FORMATS: tuple[ArtifactKind, ...] = ("onnx", "torchscript", "onnx_fp16")
DEFAULT_FORMATS: tuple[ArtifactKind, ...] = ("onnx", "torchscript")
DEFAULT_OPSET = 17
_TRACE_BATCH = 2  # trace with B > 1 so no size-1 dimension gets specialised into the graph

StepCallback = Callable[[str], None]


class ExportError(RuntimeError):
    """The export could not produce a verified model repository."""


class ParityError(ExportError):
    """An artifact's outputs differ from eager PyTorch by more than the tolerance."""


def parse_formats(text: str | Sequence[str]) -> tuple[ArtifactKind, ...]:
    """Parse `onnx,torchscript,onnx_fp16` into a validated, de-duplicated tuple."""
    items = text.split(",") if isinstance(text, str) else list(text)
    wanted = [item.strip() for item in items if item.strip()]
    unknown = sorted(set(wanted) - set(ALL_FORMATS))
    if unknown or not wanted:
        raise ValueError(f"unknown export formats {unknown}; choose from {', '.join(ALL_FORMATS)}")
    return tuple(kind for kind in ALL_FORMATS if kind in wanted)


def export_onnx(module: ServingHiera, path: Path, example: torch.Tensor, opset: int) -> None:
    """Write an ONNX graph with a dynamic batch axis and outputs `logits`, `embedding`."""
    batch_axis = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shape arithmetic, harmless here
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits", "embedding"],
            dynamic_axes={"images": batch_axis, "logits": batch_axis, "embedding": batch_axis},
        )


def export_torchscript(module: ServingHiera, path: Path, example: torch.Tensor) -> None:
    """Trace the module and save it; the trace runs at any batch size (checked by parity)."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))


def export_repository(
    built: BuiltModel,
    out_dir: str | Path,
    *,
    formats: Sequence[ArtifactKind] = DEFAULT_FORMATS,
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    on_step: StepCallback | None = None,
) -> Path:
    """Export `built` into `<out_dir>/<name>/`; nothing is left behind if any check fails."""
    step = on_step or (lambda _msg: None)
    name = name or built.variant.name
    target = Path(out_dir) / name
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    height, width = built.variant.input_size
    example = torch.randn(
        _TRACE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0)
    )
    reference = eager_runner(built.module)

    with _staging(target) as folder:
        artifacts: dict[ArtifactKind, Artifact] = {}
        for kind in formats:
            step(f"exporting {kind}")
            artifacts[kind] = _export_one(kind, built.module, folder, example, opset)
            step(f"checking {kind} parity against eager PyTorch")
            runner = _runner_for(kind, folder / artifacts[kind].file)
            parity = measure(
                reference,
                runner,
                input_size=built.variant.input_size,
                tolerance=TOLERANCE[artifacts[kind].precision],
            )
            _require_parity(kind, parity)
            artifacts[kind] = artifacts[kind].model_copy(update={"parity": parity})
        step("writing labels and manifest")
        names, ids = class_names(built.variant)
        labels_sha = write_labels(folder, names, ids, built.variant.label_subset)
        write_manifest(folder, _manifest(built, name, artifacts, labels_sha))
    return target


def _export_one(
    kind: ArtifactKind, module: ServingHiera, folder: Path, example: torch.Tensor, opset: int
) -> Artifact:
    path = folder / ARTIFACT_FILES[kind]
    if kind == "torchscript":
        export_torchscript(module, path, example)
        details: dict[str, object] = {"method": "torch.jit.trace", "trace_batch": _TRACE_BATCH}
    elif kind == "onnx":
        export_onnx(module, path, example, opset)
        details = {"opset": opset, "exporter": "torch.onnx (dynamo=False)"}
    else:
        # Half the weights and activations; inputs and outputs are float16 too, and the
        # service casts at the boundary from the graph's declared input type.
        half = copy.deepcopy(module).half()
        export_onnx(half, path, example.half(), opset)
        details = {"opset": opset, "exporter": "torch.onnx (dynamo=False)", "io_dtype": "float16"}
    return Artifact(
        file=path.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        precision="fp16" if kind == "onnx_fp16" else "fp32",
        details=details,
    )


def _runner_for(kind: ArtifactKind, path: Path) -> Runner:
    return torchscript_runner(path) if kind == "torchscript" else onnx_runner(path)


def _require_parity(kind: str, parity: ParityFigures) -> None:
    if not parity.passed:
        raise ParityError(
            f"{kind} differs from eager PyTorch beyond tolerance {parity.tolerance:g}: "
            f"embedding max abs {parity.embedding_max_abs:.3g}, logits max abs "
            f"{parity.logits_max_abs:.3g} (batch sizes {parity.batch_sizes}); no manifest written"
        )


def _manifest(
    built: BuiltModel, name: str, artifacts: dict[ArtifactKind, Artifact], labels_sha: str
) -> Manifest:
    variant, weights = built.variant, built.weights
    return Manifest(
        name=name,
        variant=VariantRecord(
            name=variant.name,
            timm_name=variant.timm_name,
            pretrained_tag=variant.pretrained_tag,
            model_kwargs=dict(variant.model_kwargs),
        ),
        weights=WeightsRecord(
            source=weights.source,
            kind=weights.kind,
            state_sha256=weights.state_sha256,
            file_sha256=weights.file_sha256,
            checkpoint_format=weights.checkpoint_format,
            seed=weights.seed,
            license="n/a (random init)" if weights.is_random else variant.license,
        ),
        preprocessing=Preprocessing.model_validate(variant, from_attributes=True),
        embed_dim=variant.embed_dim,
        num_classes=variant.num_classes,
        labels_sha256=labels_sha,
        label_subset=variant.label_subset,
        artifacts=artifacts,
        versions=_versions(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def _versions() -> dict[str, str]:
    found = {}
    for package in ("hiera-serve", "torch", "timm", "onnx", "onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """Build in a sibling temp folder and move it into place only when everything passed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.chmod(0o755)  # mkdtemp makes it private; serving containers run as another user
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
