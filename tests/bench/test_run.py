from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bench import report as report_md
from bench.baseline_app import create_baseline_app
from bench.run import main, targets
from model.hiera import BuiltModel
from tests.service.helpers import make_image
from tests.service.reference import probabilities, reference, top_indices

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_measures_everything_in_one_run_and_writes_json_and_plots(
    micro_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "--model-repository", str(micro_repository), "--device", "cpu", "--batch-sizes", "1,2",
        "--raw", "onnx:fp32,eager:fp32,eager:bf16", "--seconds", "0.5", "--concurrency", "4",
        "--loads", "0.5,2", "--max-delay-ms", "20", "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    (result,) = tmp_path.glob("bench-hiera_micro-*.json")
    report = json.loads(result.read_text())
    assert list(report["raw"]) == ["onnx fp32", "eager fp32", "eager bf16"]
    for raw in report["raw"].values():
        assert [r["batch_size"] for r in raw["runs"]] == [1, 2]
        assert raw["best_images_per_s"] == max(r["images_per_s"] for r in raw["runs"]) > 0
    bf16 = report["raw"]["eager bf16"]
    assert bf16["speedup_vs_fp32"] == pytest.approx(
        bf16["best_images_per_s"] / report["raw"]["eager fp32"]["best_images_per_s"]
    )
    assert bf16["agreement"]["photos"] == 8 and bf16["agreement"]["embedding_min_cosine"] > 0.99
    assert "agreement" not in report["raw"]["onnx fp32"]
    hiera, plain = report["servers"]["hiera-serve"]["runs"], report["servers"]["plain FastAPI"]
    assert [r["mode"] for r in hiera] == ["closed", "closed", "open", "open"]
    assert [r["concurrency"] for r in hiera[:2]] == [4, 1]
    assert set(hiera[0]["statuses"]) == {"200"} and hiera[0]["mean_batch_size"] >= 1
    assert {"decode", "preprocess", "queue", "inference"} <= set(hiera[1]["stages_ms"])
    rates = [r["offered_per_s"] for r in hiera[2:]]
    assert rates == pytest.approx([0.5 * hiera[0]["images_per_s"], 2 * hiera[0]["images_per_s"]])
    assert [r["offered_per_s"] for r in plain["runs"][2:]] == rates  # same offered loads
    assert plain["runs"][0]["stages_ms"] is None  # the plain app has no metrics
    assert [d["size"] for d in report["jpeg_draft"]] == [
        "500x375", "1024x768", "1920x1080", "4000x3000"
    ]  # fmt: skip
    assert report["jpeg_draft"][0]["input_max_abs_diff"] == 0.0  # too small to draft
    assert report["jpeg_draft"][-1]["speedup"] > 1.5
    batching = report["servers"]["hiera-serve"]["batching"]
    cores = len(os.sched_getaffinity(0))
    assert batching["solo_instance"] is (cores >= 2)  # the adaptive layout, by default
    assert batching["concurrent_batches"] == (min(cores, 4) if cores >= 2 else 1)
    one = report["servers"]["hiera-serve one instance (--no-adaptive-layout)"]
    assert one["command"].endswith("--no-adaptive-layout")
    assert one["batching"]["solo_instance"] is False and one["batching"]["instances"] == 1
    assert [r["mode"] for r in one["runs"]] == ["closed", "closed", "open", "open"]
    assert [r["offered_per_s"] for r in one["runs"][2:]] == rates  # same offered loads
    # The one-client runs were interleaved with the raw runtime at batch 1.
    assert hiera[1]["reference_ms"]["p50"] > 0 and hiera[0]["reference_ms"] is None
    # ... from a raw keep-alive socket, every answer whole and 200, for both servers.
    for single in (hiera[1], plain["runs"][1]):
        assert single["client"] == "raw socket, keep-alive" and single["requests"] > 0
        assert single["statuses"] == {"200": single["requests"]}
        assert len(single["slices"]) == 8 and all(s["p50_ms"] > 0 for s in single["slices"])
    assert {t["name"] for t in report["targets"]} >= {
        "hiera-serve: saturation >= 0.93x raw best batch",
        "hiera-serve one instance (--no-adaptive-layout): saturation >= 0.93x raw best batch",
    }
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "latency-vs-load.png", "throughput-vs-batch.png"
    ]  # fmt: skip
    assert report_md.summary(report)["model"] == "hiera_micro"
    assert "| target | measured | met |" in capsys.readouterr().out


async def test_baseline_app_answers_like_the_model(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    data = make_image(4)
    logits, _ = reference(micro_model, data)
    app = create_baseline_app(micro_repository)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://plain") as client:
        response = await client.post(
            "/v1/classify?top_k=3", content=data, headers={"Content-Type": "image/jpeg"}
        )
    assert response.status_code == 200
    scores = probabilities(logits)
    want = top_indices(logits, 3)
    got = response.json()["labels"]
    assert [g["index"] for g in got] == want
    np.testing.assert_allclose([g["score"] for g in got], scores[want], rtol=1e-4)


def _report(**changes: Any) -> dict[str, Any]:
    closed16 = {"mode": "closed", "concurrency": 16, "images_per_s": 14.0}
    closed1 = {
        "mode": "closed",
        "concurrency": 1,
        "latency_ms": {"p50": 70.0},
        "stages_ms": {"decode": 1.0, "preprocess": 3.0, "queue": 0.1},
    }
    overload = {
        "mode": "open",
        "offered_per_s": 28.0,
        "latency_ms": {"p99": 1900.0},
        "rejected_latency_ms": {"p50": 2000.0},
        "accepted_fraction": 0.5,
        "statuses": {"200": 10, "504": 10},
    }
    report: dict[str, Any] = {
        "raw_best_images_per_s": 15.0,
        "raw": {
            "onnx fp32": {"runs": [{"batch_latency_ms": {"p50": 65.0}}]},
            "onnx int8": {
                "speedup_vs_fp32": 1.7,
                "agreement": {"embedding_min_cosine": 0.9997},
                "runs": [],
            },
        },
        "servers": {
            "hiera-serve": {"runs": [closed16, closed1, overload]},
            "hiera-serve one instance (--no-adaptive-layout)": {
                "runs": [closed16 | {"images_per_s": 12.0}, closed1]
            },
            "plain FastAPI": {"runs": [{"images_per_s": 13.0}]},
        },
        "settings": {"deadline_s": 2.0},
    }
    report.update(changes)
    return report


def test_targets_are_judged_from_the_numbers() -> None:
    met = {t["name"]: t["met"] for t in targets(_report())}
    layout = "hiera-serve one instance (--no-adaptive-layout)"
    assert met == {
        "hiera-serve: saturation >= 0.93x raw best batch": True,  # 14 / 15 = 0.933
        "hiera-serve >= plain app at 16 clients": True,  # 14 vs 13
        f"{layout}: saturation >= 0.93x raw best batch": False,  # 12 / 15
        f"{layout} >= plain app at 16 clients": False,  # 12 vs 13
        "1-client p50 <= raw b1 + decode + preprocess + 2 ms": True,  # 70 <= 65 + 4 + 2
        "open loop 28.0/s: answered p99 <= deadline, excess rejected": True,
        "onnx int8: >= 1.8x fp32, embedding cosine >= 0.999": False,  # 1.7x
    }
    slower = _report(raw_best_images_per_s=15.1)  # 14 / 15.1 = 0.927
    assert not targets(slower)[0]["met"]
    # The raw b1 latency timed between the one-client slices wins over the raw phase's.
    paired = _report()
    runs = paired["servers"]["hiera-serve"]["runs"]
    runs[1] = runs[1] | {"reference_ms": {"p50": 60.0}}
    (single,) = [t for t in targets(paired) if t["name"].startswith("1-client")]
    assert not single["met"] and "vs 66.0 ms (raw b1 p50 60.0" in single["measured"]


def test_the_one_client_bound_is_judged_slice_by_slice_when_slices_exist() -> None:
    # Pooled, 70 <= 60 + 1 + 3 + 2 fails; but each slice's p50 sits 4-7 ms over the raw p50
    # timed right after it (median 4.5 ms <= 6 ms allowed): met. The host was slow in the
    # later slices, which the pooled raw p50 (60) under-weights.
    slices = [(64, 60), (64, 60), (95, 90), (97, 90)]
    report = _report()
    runs = report["servers"]["hiera-serve"]["runs"]
    runs[1] = runs[1] | {
        "reference_ms": {"p50": 60.0},
        "slices": [{"p50_ms": a, "reference_p50_ms": b} for a, b in slices],
    }
    (single,) = [t for t in targets(report) if t["name"].startswith("1-client")]
    assert single["met"], single
    assert single["measured"].startswith("slice by slice, median p50 - raw b1 p50 = 4.5 ms")
    assert "vs 6.0 ms allowed (4 slices); pooled: 70.0 ms vs 66.0 ms" in single["measured"]
    # Two slices 3 ms worse move the median past the allowance.
    for i in (0, 1):
        runs[1]["slices"][i] = {"p50_ms": 67, "reference_p50_ms": 60}
    (single,) = [t for t in targets(report) if t["name"].startswith("1-client")]
    assert not single["met"] and "= 7.0 ms" in single["measured"]


@pytest.mark.slow
def test_overload_mode_times_refusals_in_the_open_loop_and_a_burst(
    micro_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "--model-repository", str(micro_repository), "--overload", "--seconds", "1",
        "--concurrency", "4", "--max-batch-size", "1", "--queue-size", "1", "--burst", "40",
        "--factor", "4", "--deadline-s", "2", "--bursts", "2", "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    (result,) = tmp_path.glob("overload-*.json")
    report = json.loads(result.read_text())
    assert "--max-queue-size 1" in report["command"]
    sustained = report["sustained"]["images_per_s"]
    assert report["open"]["rate"] == pytest.approx(4 * sustained)
    burst, bursts = report["burst"], report["bursts"]
    assert burst["requests"] == 80 == sum(burst["statuses"].values())  # pooled over two
    assert [sum(b["statuses"].values()) for b in bursts] == [40, 40]
    for one in bursts:
        assert one["statuses"]["429"] + one["statuses"].get("200", 0) == 40
    assert burst["statuses"]["429"] == sum(b["statuses"]["429"] for b in bursts)
    assert set(burst["statuses"]) <= {"200", "429"}  # every request answered, none failed
    assert burst["statuses"]["429"] > 0 and burst["rejections_without_retry_after"] == 0
    rejected = burst["rejected_ms"]
    assert 0 < rejected["p50"] <= rejected["p99"] <= rejected["max"]
    assert rejected["max"] == max(b["rejected_ms"]["max"] for b in bursts)
    out = capsys.readouterr().out
    assert "| 2 bursts of 40, each written at once | 80 |" in out
    each = ", ".join(f"{b['rejected_ms']['p99']:.0f}" for b in bursts)
    assert f"Rejected p99 of each burst, ms: {each}." in out


def test_a_burst_answer_counts_as_arrived_once_its_content_length_body_is_in() -> None:
    from bench.load import complete

    head = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 5\r\nretry-after: 1\r\n\r\n"
    assert not complete(head[:20])  # the head is not in yet
    assert not complete(head + b"abc")  # 3 of the 5 body bytes
    assert complete(head + b"abcde")
    assert not complete(b"HTTP/1.1 200 OK\r\n\r\nbody")  # no length: only the close ends it
