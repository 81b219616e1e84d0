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
from typing import Any, Literal

import torch

from model.agreement import on_photos
from model.artifacts import (
    ARTIFACT_FILES,
    AgreementFigures,
    Artifact,
    ArtifactKind,
    Manifest,
    ParityFigures,
    Preprocessing,
    VariantRecord,
    WeightsRecord,
    serving_contract,
    verify_contract,
    write_labels,
    write_manifest,
)
from model.contract import seal_onnx, torchscript_extra_files
from model.digests import sha256_file
from model.hiera import BuiltModel, ServingHiera
from model.labels import class_names
from model.parity import TOLERANCE, Runner, eager_runner, measure, onnx_runner, torchscript_runner

# Order matters: onnx_int8 is quantized from the fp32 ONNX graph written before it.
ALL_FORMATS: tuple[ArtifactKind, ...] = ("onnx", "torchscript", "onnx_fp16", "onnx_int8")
DEFAULT_FORMATS: tuple[ArtifactKind, ...] = ("onnx", "torchscript")
DEFAULT_OPSET = 17
_PRECISION: dict[str, Literal["fp32", "fp16", "int8"]] = {"onnx_fp16": "fp16", "onnx_int8": "int8"}
_TRACE_BATCH = 2  # trace with B > 1 so no size-1 dimension gets specialised into the graph

StepCallback = Callable[[str], None]


class ExportError(RuntimeError):
    """The export could not produce a verified model repository."""


class ParityError(ExportError):
    """An artifact's outputs differ from eager PyTorch by more than the tolerance."""


class AgreementError(ExportError):
    """A reduced-precision artifact moves embeddings of real photos too far from fp32."""


def parse_formats(text: str | Sequence[str]) -> tuple[ArtifactKind, ...]:
    """Parse `onnx,torchscript,onnx_fp16` into a validated, de-duplicated, ordered tuple.

    `onnx_int8` brings `onnx` along: it is quantized from that graph.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    wanted = {item.strip() for item in items if item.strip()}
    unknown = sorted(wanted - set(ALL_FORMATS))
    if unknown or not wanted:
        raise ValueError(f"unknown export formats {unknown}; choose from {', '.join(ALL_FORMATS)}")
    if "onnx_int8" in wanted:
        wanted.add("onnx")
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


def export_torchscript(
    module: ServingHiera, path: Path, example: torch.Tensor, extra_files: dict[str, str]
) -> None:
    """Trace the module and save it with `extra_files`; the trace runs at any batch size."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=extra_files)


def export_repository(
    built: BuiltModel,
    out_dir: str | Path,
    *,
    formats: Sequence[ArtifactKind] = DEFAULT_FORMATS,
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    on_step: StepCallback | None = None,
    calibration_dir: Path | None = None,
) -> Path:
    """Export `built` into `<out_dir>/<name>/`; nothing is left behind if any check fails.

    Full-precision artifacts must match eager PyTorch on seeded inputs (parity); the int8
    artifact must agree with it on real photos (`calibration_dir`, default the packaged set).
    Each artifact carries the manifest's serving fields sealed inside it (model.contract).
    """
    step = on_step or (lambda _msg: None)
    formats = parse_formats(formats)
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
        # Labels first: their sha256 is part of the contract sealed into every artifact.
        names, ids = class_names(built.variant)
        labels_sha = write_labels(folder, names, ids, built.variant.label_subset)
        skeleton = _manifest(built, name, {}, labels_sha)
        artifacts: dict[ArtifactKind, Artifact] = {}
        for kind in formats:
            step(f"exporting {kind}")
            contract = serving_contract(skeleton, kind, _PRECISION.get(kind, "fp32"))
            artifacts[kind] = _export_one(kind, built.module, folder, example, opset, contract)
            runner = _runner_for(kind, folder / artifacts[kind].file)
            if kind == "onnx_int8":
                step(f"checking {kind} agreement with eager PyTorch fp32 on real photos")
                agreement = on_photos(
                    reference,
                    runner,
                    built.variant,
                    weights_random=built.weights.is_random,
                    calibration_dir=calibration_dir,
                )
                _require_agreement(kind, agreement)
                artifacts[kind] = artifacts[kind].model_copy(update={"agreement": agreement})
                continue
            step(f"checking {kind} parity against eager PyTorch")
            parity = measure(
                reference,
                runner,
                input_size=built.variant.input_size,
                tolerance=TOLERANCE[artifacts[kind].precision],
            )
            _require_parity(kind, parity)
            artifacts[kind] = artifacts[kind].model_copy(update={"parity": parity})
        step("checking bf16 autocast agreement with eager PyTorch fp32 on real photos")
        traced = artifacts.get("torchscript")
        autocast = autocast_agreement(
            built,
            reference,
            torchscript=folder / traced.file if traced else None,
            calibration_dir=calibration_dir,
        )
        step("writing the manifest")
        manifest = skeleton.model_copy(update={"artifacts": artifacts, "autocast": autocast})
        for kind in artifacts:
            verify_contract(folder, manifest, kind)  # what was sealed is what the manifest says
        write_manifest(folder, manifest)
    return target


def _export_one(
    kind: ArtifactKind,
    module: ServingHiera,
    folder: Path,
    example: torch.Tensor,
    opset: int,
    contract: dict[str, Any],
) -> Artifact:
    """Write one artifact with `contract` sealed inside it, then take its checksum."""
    path = folder / ARTIFACT_FILES[kind]
    if kind == "torchscript":
        export_torchscript(module, path, example, torchscript_extra_files(contract))
        details: dict[str, object] = {"method": "torch.jit.trace", "trace_batch": _TRACE_BATCH}
    elif kind == "onnx":
        export_onnx(module, path, example, opset)
        details = {"opset": opset, "exporter": "torch.onnx (dynamo=False)"}
    elif kind == "onnx_int8":
        details = quantize_int8(folder / ARTIFACT_FILES["onnx"], path)
    else:
        # Half the weights and activations; inputs and outputs are float16 too, and the
        # service casts at the boundary from the graph's declared input type.
        half = copy.deepcopy(module).half()
        export_onnx(half, path, example.half(), opset)
        details = {"opset": opset, "exporter": "torch.onnx (dynamo=False)", "io_dtype": "float16"}
    if kind != "torchscript":
        seal_onnx(path, contract)
    return Artifact(
        file=path.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        precision=_PRECISION.get(kind, "fp32"),
        details=details,
    )


INT8_OPS = ("MatMul",)  # what the int8 artifact quantizes


def quantize_int8(source: Path, path: Path) -> dict[str, object]:
    """Quantize an fp32 ONNX graph dynamically: int8 weights, activations scaled per batch.

    Dynamic, not static: it needs no calibration data to *build* (real photos are only used to
    check it), and the MatMuls that dominate Hiera's time run as int8 on ONNX Runtime's CPU
    kernels (VNNI/AMX where present). Only the MatMuls: the patch embedding's ConvInteger ran
    4x slower than its fp32 Conv (2.2 against 0.6 ms per Hiera-T image in ONNX Runtime's
    profile on a 2-core EPYC), so it stays fp32.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "consider pre-processing" advice, printed on every call
    try:
        quantize_dynamic(
            str(source), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OPS
        )
    finally:
        quiet.setLevel(level)
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "op_types": list(INT8_OPS),
        "source": source.name,
    }


def autocast_agreement(
    built: BuiltModel,
    reference: Runner,
    *,
    torchscript: Path | None = None,
    calibration_dir: Path | None = None,
) -> dict[str, AgreementFigures]:
    """Measure `--precision bf16` (CPU autocast) for eager and, given its file, TorchScript.

    Eager and TorchScript autocast differently (the traced graph gets its own casts), so each
    has its own figures, keyed "eager:bf16" and "torchscript:bf16". A mode under the bound is
    recorded, not fatal: fp32 still serves.
    """
    runners = {"eager:bf16": eager_runner(built.module, autocast=torch.bfloat16)}
    if torchscript is not None:
        runners["torchscript:bf16"] = torchscript_runner(torchscript, autocast=torch.bfloat16)
    return {
        mode: on_photos(
            reference,
            runner,
            built.variant,
            weights_random=built.weights.is_random,
            calibration_dir=calibration_dir,
        )
        for mode, runner in runners.items()
    }


def _require_agreement(kind: str, agreement: AgreementFigures) -> None:
    if not agreement.passed:
        raise AgreementError(
            f"{kind} embeddings agree with fp32 only down to cosine "
            f"{agreement.embedding_min_cosine:.5f} on {agreement.photos} photos (bound "
            f"{agreement.min_cosine_bound}); refusing to export it. Serve fp32 or bf16 instead; "
            "no manifest written"
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
