"""Helpers for the deployment tests: a real hiera-serve process, /metrics parsing, PromQL maths."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.helpers import wait_ok

ROOT = Path(__file__).resolve().parents[2]
FAKE_NVML = Path(__file__).resolve().parent / "fake_nvml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "hiera-serve.json"

# The sample names each metric type exposes (prometheus_client's text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def require_binary(name: str, package: str) -> str:
    """Return the path of `name`; in CI (CI=true) a missing one fails, elsewhere it skips."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (apt-get install --no-install-recommends {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; .ci/run installs it, so CI must have it")
    pytest.skip(reason)


def start_server(repository: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start the real `hiera-serve` CLI on 127.0.0.1:port, with a fake NVML on its path.

    The model runs on the CPU; `fake_nvml/gpu_host.py` maps its instance to the fake NVML's one
    GPU, so the real collector exports the GPU gauges: the scrape holds every series a GPU host
    has.
    """
    pythonpath = os.pathsep.join(p for p in (str(FAKE_NVML), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
    command = [
        sys.executable, str(FAKE_NVML / "gpu_host.py"), "--model-repository", str(repository),
        "--host", "127.0.0.1", "--port", str(port), "--device", "auto",
        "--max-batch-size", "4", "--max-delay-ms", "20", "--intra-op-threads", "1",
        "--log-format", "text",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, within_s: float) -> None:
    """Poll /health/ready as an orchestrator would, failing with the log if it never comes."""
    wait_ok(f"{url}/health/ready", process, log, within_s)


@dataclass
class Scrape:
    """One /metrics page: the label names seen per sample name, and every declared name."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    declared: set[str] = field(default_factory=set)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse_scrape(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        suffixes = SUFFIXES.get(family.type, ("",))
        scrape.declared.update(family.name + suffix for suffix in suffixes)
        for sample in family.samples:
            scrape.labels.setdefault(sample.name, set()).update(sample.labels)
            scrape.samples.append((sample.name, dict(sample.labels), float(sample.value)))
    return scrape


def bucket_counts(scrape: Scrape, name: str, **match: str) -> list[tuple[float, float]]:
    """Return (upper bound, cumulative count) of one histogram, summed over other labels."""
    totals: dict[float, float] = {}
    for sample_name, labels, value in scrape.samples:
        if sample_name != f"{name}_bucket":
            continue
        if any(labels.get(key) != want for key, want in match.items()):
            continue
        bound = float(labels["le"])
        totals[bound] = totals.get(bound, 0.0) + value
    return sorted(totals.items())


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile on cumulative buckets: linear inside the bucket of rank q."""
    ordered = sorted(buckets)
    assert ordered and math.isinf(ordered[-1][0]), "a histogram needs its +Inf bucket"
    total = ordered[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):  # past the last finite bucket: its bound is all we know
                return previous_bound
            if bound <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (
                count - previous_count
            )
        previous_bound, previous_count = bound, count
    return previous_bound


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expression, legend) for every target and template-variable query."""
    found = [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"${variable['name']}", variable["definition"], ""))
    return found
