"""MkDocs hook: fill the reference and benchmark pages from the code and the JSON, at build time.

A page asks for a generated block with a marker line of its own, `<!-- generated: NAME -->`;
the build replaces the line with the block NAME renders. Every block reads the live code (the
`Settings` class, the metric definitions, the error mapping, the console scripts) or the
JSON files under docs/bench, so nothing here names a setting, a metric or an error code, and
the pages cannot fall behind. tests/docs/test_generated.py checks the blocks against the code.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- generated: ([a-z0-9-]+) -->$", re.MULTILINE)
ERROR_CODE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")  # stable codes are snake_case words


def _cell(text: object) -> str:
    """Return `text` fit for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# Configuration ----------------------------------------------------------------------------


def settings_table() -> str:
    """One row per `Settings` field: flag, environment variable, default, description."""
    from pydantic_core import PydanticUndefined

    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        if field.annotation is bool:
            flag += f"`, `--no-{name.replace('_', '-')}"
        if field.default_factory is not None:
            value = field.get_default(call_default_factory=True)
            default = "—" if value in ([], None) else "depends on the machine"
        elif field.default is PydanticUndefined or field.default is None:
            default = "—"
        else:
            default = f"`{field.default}`"
        rows.append(
            f"| `{flag}` | `{prefix}{name.upper()}` | {default} | "
            f"{_cell(field.description or '')} |"
        )
    return "\n".join(rows)


# Metrics ----------------------------------------------------------------------------------

_METRIC_TYPES = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "Info": "info",
    "GaugeMetricFamily": "gauge",
}


def metric_definitions(source: Path | None = None) -> list[dict[str, Any]]:
    """Every metric service/metrics.py defines: name, type, help and labels, in source order.

    Read from the module's syntax tree, so a metric defined only in one mode (the workers'
    gauges, NVML's families) is found as well as those a fresh `Metrics()` registers.
    """
    tree = ast.parse((source or ROOT / "service" / "metrics.py").read_text())
    found: dict[str, dict[str, Any]] = {}

    def add(kind: str, name: str, help_text: str, labels: list[str]) -> None:
        full = f"{name}_total" if kind == "counter" else name
        if kind == "info":
            full = f"{name}_info"
        found.setdefault(full, {"name": full, "type": kind, "help": help_text, "labels": labels})

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if called not in _METRIC_TYPES or len(node.args) < 2:
                continue
            name, help_text = (_literal(arg) for arg in node.args[:2])
            if not isinstance(name, str) or not isinstance(help_text, str):
                continue  # built from variables: the families below, for instance
            labels = _literal(node.args[2]) if len(node.args) > 2 else None
            for keyword in node.keywords:
                if keyword.arg in ("labelnames", "labels"):
                    labels = _literal(keyword.value)
            add(_METRIC_TYPES[called], name, help_text, list(labels or []))
        elif isinstance(node, ast.ClassDef):
            # Families defined as (name, help) pairs and created in a loop (NVML's GPU gauges).
            for statement in node.body:
                if (
                    isinstance(statement, ast.Assign)
                    and isinstance(statement.targets[0], ast.Name)
                    and statement.targets[0].id == "FAMILIES"
                ):
                    for name, help_text in _literal(statement.value):
                        add("gauge", name, help_text, ["gpu", "device"])
    return list(found.values())


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def metrics_table() -> str:
    rows = ["| metric | type | labels | what |", "|---|---|---|---|"]
    for metric in metric_definitions():
        labels = ", ".join(f"`{label}`" for label in metric["labels"])
        rows.append(
            f"| `{metric['name']}` | {metric['type']} | {labels} | {_cell(metric['help'])} |"
        )
    return "\n".join(rows)


# Status codes -----------------------------------------------------------------------------


def error_codes() -> dict[tuple[int, str], str]:
    """Every (HTTP status, error code) the service answers with, and when, from the code.

    The pairs come from the code itself: `ApiError(status, "code", ...)` and its subclasses
    anywhere under service/, the statuses `to_api_error` gives each image and batcher error,
    and the status-to-code tables of the exception handlers. The descriptions come from
    `service.errors.ERROR_CODES`; a pair without one is listed as undocumented.
    """
    from service import errors

    pairs = set(_error_pairs_in_source())
    for error in _live_errors():
        api = errors.to_api_error(error)
        pairs.add((api.status, api.code))
    return {
        pair: errors.ERROR_CODES.get(pair, "(undocumented: add it to service.errors.ERROR_CODES)")
        for pair in sorted(pairs)
    }


def _error_pairs_in_source() -> Iterator[tuple[int, str]]:
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and len(node.args) >= 2:
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                status, code = (_literal(arg) for arg in node.args[:2])
                if (
                    called.endswith("Error")
                    and isinstance(status, int)
                    and isinstance(code, str)
                    and ERROR_CODE.match(code)
                ):
                    yield status, code
            elif isinstance(node, ast.Dict) and node.keys:
                # A status -> code table, such as the HTTP exception handler's.
                pairs = zip(node.keys, node.values, strict=True)
                entries = [(_literal(k), _literal(v)) for k, v in pairs if k is not None]
                if all(
                    isinstance(k, int)
                    and 400 <= k < 600
                    and isinstance(v, str)
                    and ERROR_CODE.match(v)
                    for k, v in entries
                ):
                    yield from entries


def _live_errors() -> Iterator[BaseException]:
    """One instance of every domain exception class a client can be answered with."""
    from service import batching, errors, imaging

    bases: list[type[BaseException]] = [imaging.ImageError, batching.BatcherError, errors.ApiError]
    for base in bases:
        for cls in _subclasses(base):
            # Constructors differ: try the argument lists domain errors take.
            for args in ((), ("detail",), (None, "detail")):
                try:
                    yield cls(*args)
                    break
                except TypeError:
                    continue


def _subclasses(cls: type) -> Iterator[type]:
    sub: type
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def status_table() -> str:
    _import_all_services()
    rows = ["| status | code | when |", "|---|---|---|"]
    for (status, code), when in error_codes().items():
        rows.append(f"| {status} | `{code}` | {_cell(when)} |")
    return "\n".join(rows)


def _import_all_services() -> None:
    """Import every service module, so the error classes they define are subclasses here."""
    for path in sorted((ROOT / "service").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        importlib.import_module(module.removesuffix(".__init__"))


# Command-line help ------------------------------------------------------------------------


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: command -> "module:function"."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(project.get("scripts", {}))


def cli_help(target: str) -> str:
    """Return what `<script> --help` prints, by calling the entry point in this process."""
    module_name, _, function = target.partition(":")
    main = getattr(importlib.import_module(module_name), function)
    out = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: make it the same everywhere
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["--help"])
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return out.getvalue().rstrip()


def cli_reference() -> str:
    parts = []
    for script, target in console_scripts().items():
        parts += [f"## `{script}`", "", "```text", cli_help(target), "```", ""]
    return "\n".join(parts)


# Benchmarks -------------------------------------------------------------------------------


def bench_reports() -> list[dict[str, Any]]:
    """Every `make bench` run under docs/bench, oldest first."""
    reports = [json.loads(p.read_text()) for p in (ROOT / "docs" / "bench").glob("bench-*.json")]
    return sorted(reports, key=lambda r: r["created_at"])


def bench_latest() -> str:
    from bench import report

    full = [r for r in bench_reports() if "servers" in r]
    return report.markdown(full[-1]) if full else "No `make bench` run is recorded yet."


def bench_history() -> str:
    from bench import report

    return report.history_table(bench_reports())


def gpu_check_table() -> str:
    """The GPU check runs under docs/bench: model-only and end-to-end throughput per path."""
    runs = sorted(
        (json.loads(p.read_text()) for p in (ROOT / "docs" / "bench").glob("gpu-check-*.json")),
        key=lambda r: r["created_at"],
    )
    rows = [
        "| run (UTC) | GPU | model | path | what | img/s | p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        head = f"| {run['created_at'][:16].replace('T', ' ')} | {run['gpu']} | "
        model = Path(run.get("model_repository", "")).name
        for figure in run.get("model_only", []):
            for key, value in figure.items():
                if key.endswith("_img_per_s") and isinstance(value, int | float):
                    batch = key.removesuffix("_img_per_s").replace("_", " ")
                    rows.append(
                        f"{head}`{model}` | {figure['path']} | model only, {batch} | "
                        f"{value:,.0f} | — |"
                    )
        for e2e in run.get("end_to_end", []):
            if "images_per_s" not in e2e:
                continue
            latency = e2e.get("latency_ms") or {}
            rows.append(
                f"{head}`{model}` | {e2e['backend']}, {e2e.get('decode', 'cuda')} decode | "
                f"end to end, {e2e['workers']} workers, {e2e['concurrency']} clients | "
                f"{e2e['images_per_s']:,.0f} | "
                f"{latency.get('p50', float('nan')):.0f} / {latency.get('p99', float('nan')):.0f} |"
            )
    return "\n".join(rows)


BLOCKS: dict[str, Callable[[], str]] = {
    "settings-table": settings_table,
    "metrics-table": metrics_table,
    "status-table": status_table,
    "cli-help": cli_reference,
    "bench-latest": bench_latest,
    "bench-history": bench_history,
    "gpu-check-runs": gpu_check_table,
}


def render(markdown: str) -> str:
    """Replace every generated-block marker in `markdown` with its block."""

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return BLOCKS[name]()

    return MARKER.sub(block, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs event: fill the page's generated blocks."""
    return render(markdown)
