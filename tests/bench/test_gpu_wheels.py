"""`bench/gpu_wheels.sh --dry-run` names every wheel an air-gapped GPU host needs, fetching none."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_wheels.sh"


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "constraints-gpu.txt", folder)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "PIP": f"{sys.executable} -m pip"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def gpu_pins() -> dict[str, str]:
    lines = (ROOT / "constraints-gpu.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


@pytest.mark.timeout(180)
def test_dry_run_prints_the_pinned_downloads_and_fetches_nothing(tmp_path: Path) -> None:
    done = run(tmp_path, "--dry-run", "--with-ort")

    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    wanted = {command.split()[-1] for command in commands}
    pins = gpu_pins()
    for name in ("nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "onnxruntime-gpu"):
        assert f"{name}=={pins[name]}" in wanted, name
    assert any(req.lower().startswith("fastapi") for req in wanted)
    assert all(" download " in c and "--no-deps" in c for c in commands), commands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["constraints-gpu.txt"]


def test_it_refuses_arguments_it_does_not_know(tmp_path: Path) -> None:
    done = run(tmp_path, "--dry-rnu")

    assert done.returncode == 2 and "--dry-run" in done.stderr
