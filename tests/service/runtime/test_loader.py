"""The service refuses a repository whose manifest was edited after export, on every backend."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.artifacts import FORMAT_VERSION, ManifestMismatch
from model.hiera import BuiltModel
from service.app import create_app
from service.runtime import loader
from service.runtime.loader import export_on_the_fly, plan
from service.settings import Settings
from tests.service.helpers import free_port, make_image, repository_settings, running

JPEG = {"Content-Type": "image/jpeg"}

MEAN_EDITED = (
    "field preprocessing.mean is [0.0, 0.0, 0.0] but model.onnx was exported with "
    "[0.485, 0.456, 0.406]"
)


def mean_set_to_zero(source: Path, root: Path) -> Path:
    """Copy a model folder and set its manifest's normalisation mean to 0, by hand."""
    target = Path(shutil.copytree(source, root / source.name))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["preprocessing"]["mean"] = [0, 0, 0]
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


@pytest.mark.parametrize("backend", ["onnx", "torchscript", "eager"])
def test_every_backend_refuses_an_edited_manifest(
    micro_repository: Path, tmp_path: Path, backend: str
) -> None:
    edited = mean_set_to_zero(micro_repository, tmp_path)
    with pytest.raises(ManifestMismatch, match=re.escape(MEAN_EDITED)):
        plan(Settings(model_repository=edited, backend=backend, device="cpu"))
    # The untouched folder still loads on the same backend.
    untouched = plan(Settings(model_repository=micro_repository, backend=backend, device="cpu"))
    assert untouched.card.preprocessing.mean == (0.485, 0.456, 0.406)


def test_repository_root_with_an_edited_model_is_refused(
    micro_repository: Path, tmp_path: Path
) -> None:
    mean_set_to_zero(micro_repository, tmp_path)  # tmp_path is now a root with one model
    with pytest.raises(ManifestMismatch, match=r"preprocessing\.mean"):
        plan(Settings(model_repository=tmp_path, backend="onnx", device="cpu"))


@pytest.mark.parametrize(
    ("field", "value"), [("mean", [0, 0, 0]), ("format_version", 1)], ids=["edited", "format-1"]
)
def test_export_dir_replaces_an_export_it_cannot_trust(
    micro_model: BuiltModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    value: object,
) -> None:
    monkeypatch.setattr(loader, "build", lambda *_, **__: micro_model)  # micro, not full tiny
    settings = Settings(weights="random", variant="hiera_tiny_224", export_dir=tmp_path)
    first, _ = export_on_the_fly(settings)
    manifest = json.loads((first.path / "manifest.json").read_text())
    (manifest["preprocessing"] if field == "mean" else manifest)[field] = value
    (first.path / "manifest.json").write_text(json.dumps(manifest))

    second, _ = export_on_the_fly(settings)  # refused as it is, so exported afresh

    on_disk = json.loads((second.path / "manifest.json").read_text())
    assert second.path == first.path
    assert on_disk["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert on_disk["format_version"] == FORMAT_VERSION == 2


async def test_edited_manifest_leaves_the_service_not_ready(
    micro_repository: Path, tmp_path: Path
) -> None:
    fatal: list[BaseException] = []
    app = create_app(
        repository_settings(mean_set_to_zero(micro_repository, tmp_path)), on_fatal=fatal.append
    )
    async with running(app) as client:
        ready = await client.get("/health/ready")
        answer = await client.post("/v1/embed", content=make_image(0), headers=JPEG)
    # The open probe names the kind of failure; paths and values go to the log (and on_fatal).
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "not_ready",
        "state": "failed",
        "reason": "ManifestMismatch in the model runtime",
    }
    assert answer.status_code == 503
    assert len(fatal) == 1 and MEAN_EDITED in str(fatal[0])


@pytest.mark.slow
def test_cli_exits_nonzero_naming_the_edited_field(micro_repository: Path, tmp_path: Path) -> None:
    edited = mean_set_to_zero(micro_repository, tmp_path)
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "service.cli", "--model-repository", str(edited),
               "--port", str(free_port()), "--device", "cpu"]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        assert process.wait(timeout=90) == 1
    finally:
        if process.poll() is None:
            process.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (failure,) = [line for line in lines if line["level"] == "error"]
    assert MEAN_EDITED in failure["message"] and "re-export" in failure["message"]
    assert "exc" not in failure  # one clear line, not a traceback
