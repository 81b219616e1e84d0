"""The on-disk model repository: `<repo>/<name>/` with artifacts and a checksummed manifest.

The exporter writes it, the service reads it. Every file the manifest names carries a sha256
that is verified on load, so a truncated copy or a swapped file is refused, not served. The
manifest's serving fields (preprocessing, dims, labels hash, variant, weights) are sealed
inside every artifact before its sha256 is taken and compared on load, so an edited manifest
is refused too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.contract import ContractUnreadable, read_sealed
from model.digests import sha256_file

MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.json"
# 2: every artifact carries its serving contract (model.contract); 1 had none.
FORMAT_VERSION = 2

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


class ManifestMismatch(RepositoryError):
    """The manifest says something else than the contract sealed inside an artifact."""


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
    # Runtime autocast modes measured against fp32 on real photos at export, keyed
    # "backend:precision" ("eager:bf16", "torchscript:bf16"); the service refuses a mode whose
    # figures did not pass. Not sealed in the artifacts: no artifact is served differently.
    autocast: dict[str, AgreementFigures] = Field(default_factory=dict)
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
            _require_verifiable(folder, manifest)
            verify_file(folder / manifest.labels_file, manifest.labels_sha256)
            for artifact in manifest.artifacts.values():
                verify_file(folder / artifact.file, artifact.sha256)
            for kind in manifest.artifacts:
                verify_contract(folder, manifest, kind)
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
        manifest = Manifest.model_validate_json(file.read_bytes())
    except ValueError as exc:
        raise RepositoryError(f"{file} is not a valid manifest: {exc}") from exc
    if manifest.format_version > FORMAT_VERSION:
        raise RepositoryError(
            f"{file} has format_version {manifest.format_version}, newer than this "
            f"hiera-serve reads ({FORMAT_VERSION}): upgrade hiera-serve, or export with this one"
        )
    return manifest


# The manifest fields an artifact vouches for: how images are fed to it, how its outputs are
# read and labelled, and which model and weights it is. The rest is informational (name,
# parity figures, versions, creation time) or proven otherwise: weights.source is where the
# eager backend rebuilds from, and the rebuild must hash to the sealed weights.state_sha256.
_SEALED_FIELDS = {
    "variant",
    "preprocessing",
    "embed_dim",
    "num_classes",
    "input_name",
    "output_names",
    "labels_sha256",
}


def serving_contract(
    manifest: Manifest, kind: ArtifactKind, precision: str = "fp32"
) -> dict[str, Any]:
    """Return the JSON document sealed into artifact `kind`: the manifest's serving fields."""
    document = manifest.model_dump(mode="json", include=_SEALED_FIELDS)
    document["weights"] = manifest.weights.model_dump(mode="json", exclude={"source"})
    document["artifact"] = {"kind": kind, "precision": precision}
    return document


def verify_contract(folder: Path, manifest: Manifest, kind: ArtifactKind) -> None:
    """Raise ManifestMismatch, naming each field, where the manifest and artifact disagree."""
    artifact = manifest.artifacts[kind]
    path = folder / artifact.file
    try:
        sealed = read_sealed(path, "torchscript" if kind == "torchscript" else "onnx")
    except (ContractUnreadable, OSError) as exc:
        raise RepositoryError(f"{path}: cannot read its serving contract ({exc})") from exc
    if sealed is None:
        raise RepositoryError(
            f"{path} carries no serving contract, so nothing vouches for {MANIFEST_FILE}: it "
            "was not written by this hiera-export; re-export the model repository"
        )
    expected = _flatten(serving_contract(manifest, kind, artifact.precision))
    found = _flatten(sealed)
    differences = [
        f"{_manifest_path(key, kind)} is {_show(expected.get(key, _ABSENT))} but "
        f"{artifact.file} was exported with {_show(found.get(key, _ABSENT))}"
        for key in sorted(expected.keys() | found.keys())
        if expected.get(key, _ABSENT) != found.get(key, _ABSENT)
    ]
    if differences:
        raise ManifestMismatch(
            f"{folder / MANIFEST_FILE} field {'; field '.join(differences)}: the manifest was "
            "edited after export (or the file comes from another export). Restore the "
            "original manifest.json, or re-export with hiera-export"
        )


_ABSENT = object()


def _flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Map nested objects to dotted paths (`preprocessing.mean`); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _manifest_path(key: str, kind: str) -> str:
    """Name a contract key as the manifest field an operator would look for."""
    if key == "artifact.kind":
        return f"artifacts.{kind} (the kind of artifact)"
    return f"artifacts.{kind}.precision" if key == "artifact.precision" else key


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value)


def _require_verifiable(folder: Path, manifest: Manifest) -> None:
    """Refuse repositories whose manifest no artifact can vouch for."""
    if manifest.format_version < FORMAT_VERSION:
        raise RepositoryError(
            f"{folder / MANIFEST_FILE} has format_version {manifest.format_version}: written "
            "before artifacts carried a sealed copy of the manifest's preprocessing, dims and "
            "labels hash, so an edited manifest could not be detected. Re-export it with "
            f"hiera-export (same variant and weights: variant {manifest.variant.name}, weights "
            f"{manifest.weights.source})"
        )
    if not manifest.artifacts:
        raise RepositoryError(
            f"{folder / MANIFEST_FILE} lists no artifacts, so nothing vouches for it; "
            "re-export the model repository"
        )


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
