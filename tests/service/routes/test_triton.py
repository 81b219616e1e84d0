"""Triton's model configuration and statistics extensions over REST, read by the real
tritonclient and parsed into Triton's own protobuf types."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from google.protobuf import json_format, text_format
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from model.triton import write_triton_layout
from tests.service.helpers import live_server, make_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(micro_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("triton") / "server.log"
    args = ("--max-batch-size", "4", "--max-delay-ms", "20", "--no-batch-cap-from-warmup")
    with live_server(micro_repository, log, *args) as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def test_config_is_the_one_hiera_export_writes(
    client: triton.InferenceServerClient, micro_repository: Path, tmp_path: Path
) -> None:
    served = json_format.ParseDict(client.get_model_config("hiera_micro"), mc.ModelConfig())
    # The same batching as the server's, written by the exporter into a copy of its folder.
    folder = Path(shutil.copytree(micro_repository, tmp_path / "hiera_micro"))
    config = write_triton_layout(folder, max_batch_size=4, max_queue_delay_us=20_000)
    written = text_format.Parse(config.read_text(), mc.ModelConfig())
    assert served == written
    assert served.max_batch_size == 4 and served.output[0].label_filename == "labels.txt"
    assert [list(t.dims) for t in served.output] == [[1000], [128]]
    assert served.dynamic_batching.max_queue_delay_microseconds == 20_000
    assert client.get_model_config("hiera_micro", model_version="1") == client.get_model_config(
        "hiera_micro"
    )
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_config("resnet50")
    assert unknown.value.status() == "404"
    assert {"model_configuration", "statistics"} <= set(client.get_server_metadata()["extensions"])


def _image(data: bytes) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    return tensor


def _scrape(server: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:  # fmt: skip
    return sum(v for (n, ls), v in scrape.items() if n == name and set(labels.items()) <= set(ls))


def test_statistics_count_what_metrics_shows(
    client: triton.InferenceServerClient, server: str
) -> None:
    before = json_format.ParseDict(
        client.get_inference_statistics("hiera_micro"), pb.ModelStatisticsResponse()
    )
    for seed in range(3):
        result = client.infer("hiera_micro", [_image(make_image(seed))])
        assert result.as_numpy("logits").shape == (1, 1000)
    with pytest.raises(InferenceServerException) as bad:
        client.infer("hiera_micro", [_image(b"not an image")])
    assert bad.value.status() == "415"
    stats = json_format.ParseDict(
        client.get_inference_statistics("hiera_micro"), pb.ModelStatisticsResponse()
    )
    scrape = _scrape(server)
    (model,) = stats.model_stats
    (old,) = before.model_stats
    assert model.name == "hiera_micro" and model.version == "1"
    s, o = model.inference_stats, old.inference_stats
    # The deltas are the requests just made...
    assert s.success.count - o.success.count == 3
    assert s.fail.count - o.fail.count == 1
    assert model.inference_count - old.inference_count == 3
    for stage in (s.queue, s.compute_input, s.compute_infer, s.compute_output):
        assert stage.count > 0 and stage.ns > 0
    # ...and the totals are /metrics' own (nothing ran between the two reads).
    outcomes = "hiera_request_outcomes_total"
    assert s.success.count == _total(scrape, outcomes, outcome="ok")
    assert s.fail.count == _total(scrape, outcomes) - _total(scrape, outcomes, outcome="ok")
    seconds = "hiera_request_outcome_seconds_total"
    assert s.success.ns == round(_total(scrape, seconds, outcome="ok") * 1e9)
    assert model.inference_count == _total(scrape, "hiera_batch_size_sum")
    assert model.execution_count == _total(scrape, "hiera_batch_size_count")
    stage_sum = "hiera_stage_duration_seconds_sum"
    assert s.queue.count == _total(scrape, "hiera_stage_duration_seconds_count", stage="queue")
    assert s.compute_infer.ns == round(_total(scrape, stage_sum, stage="inference") * 1e9)
    want_input = _total(scrape, stage_sum, stage="decode") + _total(
        scrape, stage_sum, stage="preprocess"
    )
    assert s.compute_input.ns == round(want_input * 1e9)
    assert s.compute_output.ns == round(_total(scrape, stage_sum, stage="postprocess") * 1e9)
    every = json_format.ParseDict(client.get_inference_statistics(), pb.ModelStatisticsResponse())
    assert [m.name for m in every.model_stats] == ["hiera_micro"]
