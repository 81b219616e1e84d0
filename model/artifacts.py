"""The on-disk model repository: `<repo>/<name>/` with artifacts and a checksummed manifest.

The exporter writes it, the service reads it. Every file the manifest names carries a sha256
that is verified on load, so a truncated copy or a swapped file is refused, not served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.checkpoints import sha256_file

MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
FORMAT_VERSION = 1

ArtifactKind = Literal["onnx", "onnx_fp16", "onnx_int8", "torchscript"]
ARTIFACT_FILES: dict[str, str] = {
    "onnx": "model.onnx",
    "onnx_fp16": "model.fp16.onnx",
    "onnx_int8": "model.int8.onnx",
    "torchscript": "model.ts",
}


class RepositoryError(ValueError):
    """A model repository that is missing, malformed or does not match its manifest."""


class ArtifactTampered(RepositoryError):
    """An artifact's bytes do not match the sha256 recorded in the manifest."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Preprocessing(_Frozen):
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_mode: str = "center"


class ParityFigures(_Frozen):
    """Worst differences between an artifact and eager PyTorch over the checked batch sizes."""

    batch_sizes: list[int]
    embedding_max_abs: float
    logits_max_abs: float
    embedding_min_cosine: float
    tolerance: float
    passed: bool


class AgreementFigures(_Frozen):
    """How a reduced-precision artifact's answers compare with fp32 eager on real photos."""

    photos: int
    source: str  # which photo set: the packaged calibration set or a folder given at export
    embedding_min_cosine: float
    embedding_mean_cosine: float
    top1_agreement: float  # meaningful only with trained weights (random init: near-ties)
    top5_overlap: float
    weights_random: bool
    min_cosine_bound: float
    passed: bool


class Artifact(_Frozen):
    file: str
    sha256: str
    bytes: int
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    details: dict[str, Any] = Field(default_factory=dict)
    parity: ParityFigures | None = None
    agreement: AgreementFigures | None = None


class WeightsRecord(_Frozen):
    source: str
    kind: Literal["pretrained", "random", "file"]
    state_sha256: str
    file_sha256: str | None = None
    checkpoint_format: str | None = None
    seed: int | None = None
    license: str


class VariantRecord(_Frozen):
    name: str
    timm_name: str
    pretrained_tag: str
    model_kwargs: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Frozen):
    format_version: int = FORMAT_VERSION
    name: str
    variant: VariantRecord
    weights: WeightsRecord
    preprocessing: Preprocessing
    embed_dim: int
    num_classes: int
    input_name: str = "images"
    output_names: tuple[str, str] = ("logits", "embedding")
    labels_file: str = LABELS_FILE
    labels_sha256: str
    label_subset: str | None
    artifacts: dict[ArtifactKind, Artifact]
    versions: dict[str, str]
    created_at: str


class ModelRepository:
    """One verified model folder: the manifest, the labels and the artifact paths."""

    def __init__(self, path: Path, manifest: Manifest, labels: list[str]) -> None:
        self.path = path
        self.manifest = manifest
        self.labels = labels

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> ModelRepository:
        """Read `<path>/manifest.json` and (by default) verify every checksum it records."""
        folder = Path(path)
        manifest = read_manifest(folder)
        if verify:
            verify_file(folder / manifest.labels_file, manifest.labels_sha256)
            for artifact in manifest.artifacts.values():
                verify_file(folder / artifact.file, artifact.sha256)
        labels = json.loads((folder / manifest.labels_file).read_text())["names"]
        if len(labels) != manifest.num_classes:
            raise RepositoryError(
                f"{folder / manifest.labels_file} has {len(labels)} labels but the model has "
                f"{manifest.num_classes} classes"
            )
        return cls(folder, manifest, labels)

    def artifact_path(self, kind: str) -> Path:
        """Return the path of artifact `kind`, or explain which kinds this repository has."""
        if kind not in self.manifest.artifacts:
            have = ", ".join(self.manifest.artifacts) or "none"
            raise RepositoryError(
                f"{self.path} has no {kind} artifact (it has: {have}); re-run hiera-export "
                f"with --formats including {kind}"
            )
        return self.path / self.manifest.artifacts[kind].file


def read_manifest(folder: Path) -> Manifest:
    """Parse and validate a manifest, with an error that says what to do when it is absent."""
    file = folder / MANIFEST_FILE
    if not file.is_file():
        raise RepositoryError(
            f"{file} not found: point at a folder written by hiera-export (one that holds "
            "manifest.json), not at its parent"
        )
    try:
        return Manifest.model_validate_json(file.read_bytes())
    except ValueError as exc:
        raise RepositoryError(f"{file} is not a valid manifest: {exc}") from exc


def verify_file(path: Path, expected_sha256: str) -> None:
    """Raise ArtifactTampered unless `path` exists and hashes to `expected_sha256`."""
    if not path.is_file():
        raise RepositoryError(f"{path} is named in the manifest but missing")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactTampered(
            f"{path} does not match its manifest checksum (sha256 {actual[:16]}..., "
            f"expected {expected_sha256[:16]}...): the file was modified or truncated; "
            "re-export the model repository"
        )


def write_labels(folder: Path, names: list[str], ids: list[str] | None, subset: str | None) -> str:
    """Write labels.json and return its sha256."""
    path = folder / LABELS_FILE
    path.write_text(json.dumps({"subset": subset, "names": names, "ids": ids}, indent=0))
    return sha256_file(path)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write the manifest last, so a folder with a manifest is a complete export."""
    path = folder / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(path)
    return path
