from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.run import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_measures_raw_and_service_and_writes_json(
    micro_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "--model-repository", str(micro_repository), "--device", "cpu", "--batch-sizes", "1,2",
        "--seconds", "0.5", "--concurrency", "4", "--max-delay-ms", "20",
        "--image", str(ROOT / "examples" / "grace_hopper.jpg"), "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    (result,) = tmp_path.glob("bench-hiera_micro-onnx-*.json")
    report = json.loads(result.read_text())
    assert [r["batch_size"] for r in report["raw"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in report["raw"])
    service = report["service"]
    assert service["requests"] > 0 and set(service["statuses"]) == {"200"}
    assert service["images_per_s"] > 0 and service["mean_batch_size"] >= 1
    assert (
        0
        < report["service_vs_best_raw"]
        == pytest.approx(service["images_per_s"] / max(r["images_per_s"] for r in report["raw"]))
    )
    assert "service / best raw" in capsys.readouterr().out
