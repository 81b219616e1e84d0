from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from bench.frontend import STAGES, CodeRun
from bench.photos import resized_jpeg
from bench.run import main

ROOT = Path(__file__).resolve().parents[2]
PHOTO = ROOT / "examples" / "grace_hopper.jpg"


def test_the_bench_image_is_a_500x375_jpeg() -> None:
    with Image.open(io.BytesIO(resized_jpeg(500, 375, PHOTO))) as image:
        assert (image.format, image.size) == ("JPEG", (500, 375))


def test_runs_parse_label_and_source() -> None:
    assert CodeRun.parse("now:.") == CodeRun("now", None)
    assert CodeRun.parse("base:/tmp/base") == CodeRun("base", Path("/tmp/base"))
    with pytest.raises(ValueError, match="label:source"):
        CodeRun.parse("no-source")


@pytest.mark.slow
def test_frontend_mode_reports_cpu_per_request_by_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "--frontend", "--requests", "40", "--warmup", "8", "--repeats", "1", "--concurrency", "4",
        "--latency-ms", "2", "--image", str(PHOTO), "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    (path,) = tmp_path.glob("frontend-*.json")
    report = json.loads(path.read_text())
    (sample,) = report["repeats"]["current"]
    assert sample["statuses"] == {"200": 40}  # floor requests are not mixed in
    cpu = sample["cpu_ms_per_request"]
    assert set(cpu) == set(STAGES)
    # Every stage did real work: decoding a 500x375 JPEG alone takes well over 0.1 ms.
    assert cpu["decode"] > 0.1 and cpu["preprocess"] > 0.1 and cpu["event_loop"] > 0.05
    assert 0 < cpu["http_floor"] < cpu["event_loop"]
    parts = cpu["decode"] + cpu["preprocess"] + cpu["event_loop"] + cpu["model_threads"]
    assert cpu["total"] == pytest.approx(parts + cpu["other"])
    assert cpu["other"] > -0.05  # thread clocks never add up to more than the process's
    assert report["summary"]["current"]["event_loop"]["median"] == cpu["event_loop"]
    assert 1 <= report["summary"]["current"]["mean_batch_size"] <= 8
    assert "front-end CPU ms per request" in capsys.readouterr().out
