"""The Grafana dashboard: valid, provisioned, and querying only series the live service exports."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.helpers import ROOT, Scrape, load_dashboard, panels, parse_scrape, queries

PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"

# Labels Prometheus attaches to every scraped series itself.
TARGET_LABELS = {"instance", "job"}
# Label sets of families that exist in /metrics but have no series until an event the test does
# not provoke (a queued image dropped because its client went away or its deadline passed).
UNOBSERVED = {"hiera_dropped_total": {"reason"}}
# What the issue asks the dashboard to show, by the series that carry it.
REQUIRED = {
    "hiera_request_outcomes_total",  # inference requests by outcome
    "hiera_requests_received_total",  # ... and received: the accounting equation
    "hiera_stage_duration_seconds_bucket",  # p50/p99 per stage
    "hiera_batch_size_bucket",  # batch size distribution
    "hiera_queue_depth",
    "hiera_failures_total",  # rejections by reason
    "hiera_dropped_total",  # drops by reason
    "hiera_gpu_utilization_ratio",
    "hiera_gpu_memory_used_bytes",
}

METRIC = re.compile(r"\bhiera_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\{([^{}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LEGEND = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")


def label_names(expr: str) -> set[str]:
    used = {name for body in SELECTOR.findall(expr) for name in MATCHER.findall(body)}
    for group in GROUPING.findall(expr):
        used.update(name.strip() for name in group.split(",") if name.strip())
    return used


def problems(dashboard: dict[str, Any], scrape: Scrape) -> list[str]:
    """Name every query that asks for a series or label the scrape does not have."""
    found = []
    for title, expr, legend in queries(dashboard):
        names = set(METRIC.findall(expr))
        if not names:
            found.append(f"{title}: queries no hiera_ metric: {expr}")
        available = set(TARGET_LABELS)
        for name in sorted(names):
            if name not in scrape.declared and name not in scrape.labels:
                found.append(f"{title}: {name} is not in /metrics")
            available |= scrape.labels.get(name, set()) | UNOBSERVED.get(name, set())
        for label in sorted(label_names(expr) - available):
            found.append(f"{title}: label {label!r} is on none of {sorted(names)}")
        grouped = {n.strip() for g in GROUPING.findall(expr) for n in g.split(",") if n.strip()}
        for label in LEGEND.findall(legend):
            if grouped and label not in grouped:
                found.append(f"{title}: legend uses {label!r}, which by ({sorted(grouped)}) drops")
    return found


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "hiera-serve"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    queried = {name for _, expr, _ in queries(dashboard) for name in METRIC.findall(expr)}
    assert queried >= REQUIRED, f"missing panels for {sorted(REQUIRED - queried)}"


def test_provisioning_loads_this_dashboard_from_the_compose_mount() -> None:
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert (source["type"], source["uid"], source["url"]) == (
        "prometheus", "prometheus", "http://prometheus:9090",
    )  # fmt: skip
    variable = load_dashboard()["templating"]["list"][0]
    assert variable["current"]["value"] == source["uid"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "hiera-serve.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{path}:ro" in mounts


def test_the_check_catches_unknown_metrics_and_labels() -> None:
    dashboard = load_dashboard()
    target = panels(dashboard)[1]["targets"][0]
    target["expr"] = target["expr"].replace("hiera_request_outcomes_total", "hiera_outcomes_total")
    gpu = next(p for p in panels(dashboard) if p["title"] == "GPU utilisation")["targets"][0]
    gpu["expr"] = gpu["expr"].replace("by (instance, gpu, device)", "by (instance, gpu_uuid)")
    scrape = parse_scrape(
        "# TYPE hiera_request_outcomes counter\n"
        'hiera_request_outcomes_total{endpoint="classify",outcome="ok"} 1\n'
        "# TYPE hiera_gpu_utilization_ratio gauge\n"
        'hiera_gpu_utilization_ratio{gpu="GPU-1",device="cuda:0"} 0.5\n'
    )
    found = problems(dashboard, scrape)
    assert any("hiera_outcomes_total is not in /metrics" in p for p in found), found
    assert any("label 'gpu_uuid'" in p for p in found), found


@pytest.mark.slow
def test_every_dashboard_query_matches_the_live_metrics(live_url: str) -> None:
    scrape = parse_scrape(httpx.get(f"{live_url}/metrics", timeout=10).text)
    assert problems(load_dashboard(), scrape) == []
