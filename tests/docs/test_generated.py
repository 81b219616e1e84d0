"""The generated reference pages follow the code: what is added to it appears, and nothing is
answered, exported or configured that the pages leave out."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from service import errors
from service.metrics import Metrics
from service.settings import Settings
from tests.docs.examples import ROOT


def _load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docs_generated", ROOT / "docs/hooks/generated.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generated = _load_hook()


def _rows(table: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        for line in table.splitlines()[2:]
    ]


def test_every_setting_has_its_row_with_flag_env_and_default() -> None:
    rows = {row[0].split("`")[1]: row for row in _rows(generated.settings_table())}
    assert len(rows) == len(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        row = rows[f"--{name.replace('_', '-')}"]
        assert row[1] == f"`HIERA_{name.upper()}`"
        if field.default_factory is None and field.default is not None:
            assert row[2] == f"`{field.default}`"
        assert row[3] == (field.description or "").replace("|", "\\|")


def test_a_setting_added_to_the_class_appears_without_touching_the_docs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class WithANewField(Settings):
        model_config = SettingsConfigDict(env_prefix="HIERA_")
        warmup_images: int = Field(7, description="images sent through each instance at start")

    monkeypatch.setattr("service.settings.Settings", WithANewField)
    assert (
        "| `--warmup-images` | `HIERA_WARMUP_IMAGES` | `7` | images sent through each instance "
        "at start |" in generated.settings_table()
    )


def test_every_metric_a_live_registry_exports_is_in_the_table() -> None:
    documented = {metric["name"] for metric in generated.metric_definitions()}
    metrics = Metrics()
    exported = set()
    for family in metrics.registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        exported.add(family.name + suffix)
    assert exported, "a fresh Metrics() registers nothing?"
    assert exported <= documented, f"not in the metrics table: {sorted(exported - documented)}"


def test_a_metric_added_to_the_module_appears(tmp_path: Path) -> None:
    source = (ROOT / "service/metrics.py").read_text()
    source += '\nEXTRA = Counter("hiera_decode_retries", "Decodes retried.", ["format"])\n'
    (tmp_path / "metrics.py").write_text(source)
    found = {m["name"]: m for m in generated.metric_definitions(tmp_path / "metrics.py")}
    assert found["hiera_decode_retries_total"] == {
        "name": "hiera_decode_retries_total",
        "type": "counter",
        "help": "Decodes retried.",
        "labels": ["format"],
    }
    assert found["hiera_gpu_memory_used_bytes"]["labels"] == ["gpu", "device"]  # a family


def test_every_error_the_service_answers_with_is_described_and_nothing_else() -> None:
    generated._import_all_services()
    answered = generated.error_codes()
    undescribed = sorted(pair for pair in answered if pair not in errors.ERROR_CODES)
    assert not undescribed, f"add these to service.errors.ERROR_CODES: {undescribed}"
    stale = sorted(set(errors.ERROR_CODES) - set(answered))
    assert not stale, f"described but never answered (remove from ERROR_CODES): {stale}"
    # The mapping itself is what the table shows: statuses come from the code.
    assert (429, "queue_full") in answered and (413, "too_many_images") in answered


def test_every_console_script_has_its_help() -> None:
    scripts = generated.console_scripts()
    assert {"hiera-serve", "hiera-export", "hiera-bench"} <= set(scripts)
    reference = generated.cli_reference()
    for script, target in scripts.items():
        assert f"## `{script}`" in reference
        assert generated.cli_help(target).startswith(f"usage: {script}")
    assert "--max-batch-size" in reference and "--list-variants" in reference


def test_the_benchmark_pages_show_every_run() -> None:
    files = sorted((ROOT / "docs/bench").glob("bench-*.json"))
    assert len(_rows(generated.bench_history())) == len(files)
    latest = max(
        (json.loads(p.read_text()) for p in files if "servers" in json.loads(p.read_text())),
        key=lambda report: report["created_at"],
    )
    assert latest["created_at"] in generated.bench_latest()
    gpu_runs = list((ROOT / "docs/bench").glob("gpu-check-*.json"))
    assert len(_rows(generated.gpu_check_table())) >= len(gpu_runs)


def test_every_marker_names_a_block() -> None:
    for page in (ROOT / "docs").rglob("*.md"):
        for name in generated.MARKER.findall(page.read_text()):
            assert name in generated.BLOCKS, f"{page}: unknown generated block {name!r}"


@pytest.mark.slow
def test_the_site_builds_strictly_with_the_generated_tables(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    configuration = (tmp_path / "configuration/index.html").read_text()
    assert all(f"HIERA_{name.upper()}" in configuration for name in Settings.model_fields)
    assert "<!-- generated:" not in configuration
    status = (tmp_path / "api/status-codes/index.html").read_text()
    assert all(re.search(rf"<code>{code}</code>", status) for _, code in errors.ERROR_CODES)
