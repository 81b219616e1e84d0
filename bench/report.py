"""Turn a `hiera-bench` report into a Markdown table and PNG plots people can read."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def _ms(lat: dict[str, float] | None, key: str) -> str:
    return "—" if lat is None else f"{lat[key]:.0f}"


def _stages(run: dict[str, Any]) -> str:
    stages = run.get("stages_ms")
    if not stages:
        return "—"
    return ", ".join(f"{k} {v:.1f}" for k, v in stages.items())


def _statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{count} x {status}" for status, count in statuses.items())


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Return a run's headline figures: one row of the Benchmarks page's history table.

    A report that carries its own `summary` (a run kept only as its printed figures) gives
    that instead.
    """
    if "summary" in report:
        return dict(report["summary"])
    m, best = report["machine"], report["raw_best_images_per_s"]
    hiera = report["servers"]["hiera-serve"]["runs"]
    plain = report["servers"].get("plain FastAPI")
    single = hiera[1]
    stages = single.get("stages_ms") or {}
    allowance = stages.get("decode", 0) + stages.get("preprocess", 0) + 2.0
    if single.get("slices"):
        over = statistics.median(s["p50_ms"] - s["reference_p50_ms"] for s in single["slices"])
        one_client = f"{over:.1f} vs {allowance:.1f} ms over raw"
    else:
        raw_b1 = (
            single.get("reference_ms")
            or next(iter(report["raw"].values()))["runs"][0]["batch_latency_ms"]
        )
        one_client = f"{single['latency_ms']['p50']:.1f} vs {raw_b1['p50'] + allowance:.1f} ms"
    speedups = {label: raw["speedup_vs_fp32"] for label, raw in report["raw"].items()}
    return {
        "created_at": report["created_at"],
        "model": report["model"],
        "machine": f"{m['cpu']} ({m['cpus']} cores)",
        "saturation_vs_raw_best": hiera[0]["images_per_s"] / best,
        "vs_plain_app": hiera[0]["images_per_s"] / plain["runs"][0]["images_per_s"]
        if plain
        else None,
        "one_client": one_client,
        "int8_vs_fp32": speedups.get("onnx int8"),
        "bf16_vs_fp32": speedups.get("eager bf16"),
        "targets_met": all(t["met"] for t in report["targets"]),
    }


def history_table(reports: list[dict[str, Any]]) -> str:
    """Render every run's headline figures as one Markdown table, oldest first."""

    def ratio(value: float | None, unit: str = "") -> str:
        return "—" if value is None else f"{value:.2f}{unit}"

    rows = sorted((summary(r) for r in reports), key=lambda s: s["created_at"])
    lines = [
        "| run (UTC) | model | machine | saturation / raw best (>= 0.93) | vs plain app "
        "(>= 1) | 1-client p50 vs bound | int8 / fp32 (>= 1.8x) | bf16 / fp32 (>= 1.8x) | "
        "all targets met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rows:
        lines.append(
            f"| {s['created_at'][:16].replace('T', ' ')} | `{s['model']}` | {s['machine']} | "
            f"{ratio(s['saturation_vs_raw_best'])} | {ratio(s['vs_plain_app'], 'x')} | "
            f"{s['one_client']} | {ratio(s['int8_vs_fp32'], 'x')} | "
            f"{ratio(s['bf16_vs_fp32'], 'x')} | {'yes' if s['targets_met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    """Return the report's tables as Markdown."""
    m = report["machine"]
    lines = [
        f"`{report['model']}`, {m['cpu']} ({m['cpus']} cores), load average "
        f"{m['load_before'][0]:.1f} before / {m['load_after'][0]:.1f} after, "
        f"{report['settings']['seconds']:.0f} s per point, {report['created_at']}",
        "",
        "| raw runtime | " + " | ".join(f"b{b} img/s" for b in report["batch_sizes"])
        + " | best | vs fp32 | embedding cosine vs fp32 (min / mean) | top-1 agreement |",
        "|---|" + "---|" * len(report["batch_sizes"]) + "---|---|---|---|",
    ]  # fmt: skip
    for label, raw in report["raw"].items():
        rates = " | ".join(f"{r['images_per_s']:.1f}" for r in raw["runs"])
        agree = raw.get("agreement")
        cos = top1 = "—"
        if agree:
            cos = f"{agree['embedding_min_cosine']:.5f} / {agree['embedding_mean_cosine']:.5f}"
            top1 = f"{agree['top1_agreement']:.2f}"
        lines.append(
            f"| {label} | {rates} | {raw['best_images_per_s']:.1f} | "
            f"{raw['speedup_vs_fp32']:.2f}x | {cos} | {top1} |"
        )
    batching = report["servers"].get("hiera-serve", {}).get("batching")
    if batching:
        lines += [
            "",
            f"hiera-serve warm-up, ms per image by batch size: "
            f"{batching['ms_per_image_by_batch_size']} -> batch cap {batching['batch_cap']} "
            f"(--max-batch-size {batching['max_batch_size']})",
        ]
    lines += [
        "",
        "| server | load | img/s | / raw best | p50 ms | p95 ms | p99 ms | statuses | "
        "mean batch | server stages, mean ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = report["raw_best_images_per_s"]
    for name, server in report["servers"].items():
        for run in server["runs"]:
            load = (
                f"{run['concurrency']} clients"
                if run["mode"] == "closed"
                else f"open {run['offered_per_s']:.1f}/s"
            )
            batch = run.get("mean_batch_size")
            lines.append(
                f"| {name} | {load} | {run['images_per_s']:.1f} | "
                f"{run['images_per_s'] / best:.2f} | {_ms(run['latency_ms'], 'p50')} | "
                f"{_ms(run['latency_ms'], 'p95')} | {_ms(run['latency_ms'], 'p99')} | "
                f"{_statuses(run['statuses'])} | {'—' if batch is None else f'{batch:.2f}'} | "
                f"{_stages(run)} |"
            )
    if report.get("jpeg_draft"):
        lines += [
            "",
            "| JPEG size | decode+crop exact ms | with --jpeg-draft ms | speed-up | input diff "
            "mean / max | embedding cosine min / mean | top-5 overlap |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in report["jpeg_draft"]:
            lines.append(
                f"| {d['size']} ({d['photos']} photos) | {d['exact_ms']:.1f} | "
                f"{d['draft_ms']:.1f} | {d['speedup']:.2f}x | {d['input_mean_abs_diff']:.3f} / "
                f"{d['input_max_abs_diff']:.2f} | {d['embedding_min_cosine']:.5f} / "
                f"{d['embedding_mean_cosine']:.5f} | {d['top5_overlap']:.2f} |"
            )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in report["targets"]:
        lines.append(
            f"| {target['name']} | {target['measured']} | {'yes' if target['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def overload_table(report: dict[str, Any]) -> str:
    """Render `hiera-bench --overload` as Markdown: rejections and acceptances, per phase."""
    sustained = report["sustained"]["images_per_s"]
    lines = [
        f"`{report['model']}`, {report['machine'].get('cpu', '')}, sustained "
        f"{sustained:.1f} img/s (closed loop); `{report['command']}`",
        "",
        "| phase | requests | statuses | rejected p50 / p99 / max ms | accepted p50 / p99 ms "
        "| rejections without Retry-After |",
        "|---|---|---|---|---|---|",
    ]
    bursts = report.get("bursts", [report["burst"]])
    for name, run in (("open", report["open"]), ("burst", report["burst"])):
        label = (
            f"open loop {run['rate']:.1f}/s"
            if name == "open"
            else f"{len(bursts)} bursts of {bursts[0]['requests']}, each written at once"
        )
        rej, acc = run["rejected_ms"], run["accepted_ms"]
        lines.append(
            f"| {label} | {run['requests']} | {run['statuses']} | "
            f"{_ms(rej, 'p50')} / {_ms(rej, 'p99')} / {_ms(rej, 'max')} | "
            f"{_ms(acc, 'p50')} / {_ms(acc, 'p99')} | {run['rejections_without_retry_after']} |"
        )
    each = ", ".join(_ms(b["rejected_ms"], "p99") for b in bursts)
    lines += ["", f"Rejected p99 of each burst, ms: {each}."]
    return "\n".join(lines)


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Draw latency vs offered load and throughput vs batch size; return the PNG paths.

    The files keep their names from run to run (the latest run's plots); the JSON files keep
    the history.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, s = report["machine"], report["settings"]
    caption = (
        f"{report['model']} | {m['cpu']}, {m['cpus']} cores, load avg "
        f"{m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after | onnxruntime "
        f"{m['versions'].get('onnxruntime', '?')}, torch {m['versions'].get('torch', '?')}\n"
        f"hiera-serve --max-batch-size "
        f"{s['max_batch_size']} --max-delay-ms {s['max_delay_ms']:g} --request-timeout-s "
        f"{s['deadline_s']:g} | {report['created_at']}"
    )
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = [f"C{i}" for i in range(len(report["servers"]))]
    for (name, server), color in zip(report["servers"].items(), colors, strict=True):
        runs = sorted(
            (r for r in server["runs"] if r["mode"] == "open"), key=lambda r: r["offered_per_s"]
        )
        rates = [r["offered_per_s"] for r in runs]
        for key, style in (("p50", "-"), ("p99", "--")):
            values = [r["latency_ms"][key] if r["latency_ms"] else float("nan") for r in runs]
            ax.plot(rates, values, style, marker="o", color=color, label=f"{name} {key}")
        for rate, r in zip(rates, runs, strict=True):
            if r["accepted_fraction"] < 0.999:
                ax.annotate(
                    f"{100 * (1 - r['accepted_fraction']):.0f}% rejected",
                    (rate, r["latency_ms"]["p99"] if r["latency_ms"] else 0),
                    textcoords="offset points",
                    xytext=(-10, 8),
                    fontsize=8,
                    color=color,
                )
    ax.axhline(1e3 * s["deadline_s"], color="grey", lw=0.8, ls=":", label="hiera-serve deadline")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, requests/s (Poisson arrivals, one 500x375 JPEG each)")
    ax.set_ylabel("latency of answered requests, ms")
    ax.set_title("Latency vs offered load (open loop)")
    paths.append(_finish(fig, ax, caption, out / "latency-vs-load.png"))

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, raw in report["raw"].items():
        sizes = [r["batch_size"] for r in raw["runs"]]
        ax.plot(sizes, [r["images_per_s"] for r in raw["runs"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["batch_sizes"], [str(b) for b in report["batch_sizes"]])
    ax.set_xlabel("batch size (raw runtime, no HTTP)")
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs batch size, per backend and precision")
    paths.append(_finish(fig, ax, caption, out / "throughput-vs-batch.png"))
    return paths


def _finish(fig: Any, ax: Any, caption: str, path: Path) -> Path:
    """Add the legend and the caption (machine, versions, settings), save as PNG, close."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, caption, fontsize=7, color="dimgrey")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
