"""A real Prometheus scraping a real hiera-serve: quantiles, alert rules, dashboard queries."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.helpers import (
    ROOT,
    bucket_counts,
    histogram_quantile,
    load_dashboard,
    parse_scrape,
    queries,
    require_binary,
)
from tests.service.helpers import free_port, make_image, wait_ok

pytestmark = pytest.mark.slow

RULES = ROOT / "docker" / "prometheus" / "rules" / "hiera-serve.yml"
CLASSIFY_LATENCY = 'hiera_request_duration_seconds_bucket{job="hiera-serve", endpoint="classify"}'


class Prometheus:
    """A Prometheus server on a loopback port, scraping one target every second."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_for(self, what: str, condition: Callable[[], bool], within_s: float = 30) -> None:
        deadline = time.monotonic() + within_s
        while not condition():
            assert time.monotonic() < deadline, f"Prometheus never saw {what} in {within_s} s"
            time.sleep(0.25)


@pytest.fixture(scope="module")
def prometheus(live_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """One server for this module: starting Prometheus costs seconds on 2 busy cores."""
    binary = require_binary("prometheus", "prometheus")
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "hiera-serve",
                "static_configs": [{"targets": [live_url.removeprefix("http://")]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    command = [
        binary, f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_ok(f"{server.url}/-/ready", process, log, within_s=30, poll_s=0.1)
        server.wait_for("the target up", lambda: server.query('up{job="hiera-serve"} == 1') != [])
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_prometheus_reads_back_latency_quantiles_of_real_requests(
    live_url: str, prometheus: Prometheus
) -> None:
    jpeg = {"Content-Type": "image/jpeg"}
    with httpx.Client(base_url=live_url, timeout=60) as client:
        for seed in range(10):
            image = make_image(seed, size=(200 + 40 * seed, 150 + 30 * seed))
            assert client.post("/v1/classify", content=image, headers=jpeg).status_code == 200
        scrape = parse_scrape(client.get("/metrics").text)  # nothing classifies after this
    buckets = bucket_counts(scrape, "hiera_request_duration_seconds", endpoint="classify")
    total = buckets[-1][1]
    prometheus.wait_for(
        f"all {total:.0f} classify requests",
        lambda: (
            prometheus.query(f"{CLASSIFY_LATENCY.replace('_bucket', '_count')} == {total}") != []
        ),
    )

    # Cumulative buckets: Prometheus must land exactly where our own interpolation does.
    for q in (0.5, 0.9, 0.99):
        got = prometheus.scalar(f"histogram_quantile({q}, sum by (le) ({CLASSIFY_LATENCY}))")
        assert got == pytest.approx(histogram_quantile(q, buckets), rel=1e-9), q
        assert 0 < got <= max(bound for bound, _ in buckets if not math.isinf(bound))

    # The dashboard's form, over a rate window: defined, and inside the observed range.
    p99 = prometheus.scalar(f"histogram_quantile(0.99, sum by (le) (rate({CLASSIFY_LATENCY}[1m])))")
    slowest = next(bound for bound, count in buckets if count == total)
    assert 0 < p99 <= slowest


def test_alert_rules_evaluate_against_live_series_and_stay_quiet(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]]:
        body = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(r["lastEvaluation"][:4] != "0001" for r in rules) else []

    prometheus.wait_for("every rule evaluated", lambda: evaluated() != [])
    rules = evaluated()
    assert {rule["name"] for rule in rules} == {
        "HieraServeDown", "HieraNotReady", "HieraLatencyP99High", "HieraQueueSaturated",
        "HieraRejectingRequests", "HieraServerErrors", "HieraRuntimeErrors",
    }  # fmt: skip
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    assert [r["name"] for r in rules if r["state"] != "inactive"] == []  # a healthy service


def test_every_dashboard_query_runs_in_prometheus(prometheus: Prometheus) -> None:
    ready = prometheus.query('min by (instance) (hiera_ready{job="hiera-serve"})')
    assert [float(series["value"][1]) for series in ready] == [1.0]
    for title, expr, _ in queries(load_dashboard()):
        if expr.startswith("label_values("):  # a Grafana function, not PromQL
            metric = expr.removeprefix("label_values(").split(",")[0]
            assert prometheus.query(metric), title
            continue
        promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        prometheus.query(promql)  # asserts that Prometheus accepts and evaluates it
    # The GPU gauges come through the real collector from the fake NVML (42 % busy).
    gpu = prometheus.query("max by (instance, gpu) (hiera_gpu_utilization_ratio)")
    assert [float(series["value"][1]) for series in gpu] == [0.42]
