"""`hiera-bench --split`: the front ends / engines layout, measured beside the inline one.

Four measurements, each in one run so that their ratios share the same minutes of the machine:

- `noop`: the process layout with a sleeping model (bench/noop_engine.py) and 1, then 2, front
  ends, in alternation: requests per second at saturation, and the CPU each role spends per
  request (from /proc), which projects what a host with more cores can serve;
- `model`: the real ONNX model on this CPU, inline against process, at saturation, alternating;
- `memory`: the proportional set size (PSS) of every process of `--workers 2` in both layouts:
  one model copy against two;
- `corridor`: the transport alone, a front end's `ProcessEngine` driving a sleeping engine at a
  fixed rate without HTTP or decoding: CPU per image in each process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.load import complete, request_bytes

_TICK = os.sysconf("SC_CLK_TCK")
# A round's figure moves by several microseconds with the host's state: the median of five.
_CORRIDOR_ROUNDS = 5


def cpu_seconds(pid: int) -> float:
    """Return a process's CPU seconds so far, every thread's (0 once it is gone).

    From the scheduler's own account (/proc/PID/task/*/schedstat, nanoseconds) where the
    kernel keeps one; else user + system time from /proc/PID/stat, in clock ticks (10 ms
    each: a few microseconds' resolution per image over a few thousand images).
    """
    try:
        return (
            sum(
                int((task / "schedstat").read_text().split()[0])
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            / 1e9
        )
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_roles(root: int) -> dict[str, list[int]]:
    """Return the pids of a hiera-serve process tree by role: supervisor, engine, worker."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    roles: dict[str, list[int]] = {"supervisor": [], "engine": [], "worker": []}
    below = children.get(root, [])
    if not below:
        roles["worker"].append(root)  # one inline process serves by itself
        return roles
    roles["supervisor"].append(root)
    for pid in below:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"service.engine.process" in command or b"noop_engine" in command:
            roles["engine"].append(pid)
        elif b"service.workers" in command:
            roles["worker"].append(pid)
    return roles


def pss_mib(pid: int) -> float:
    """Return a process's proportional set size: shared pages split among their users."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Tree:
    """A served process tree: its port, its root process and their roles (process_roles)."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    roles: dict[str, list[int]] = field(default_factory=dict)


@contextlib.contextmanager
def serve(module: str, args: list[str], env: dict[str, str] | None = None) -> Iterator[Tree]:
    """Run `python -m module` (hiera-serve flags) on a free port until it is ready."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="hiera-split-"))
    log = folder / "server.log"
    command = [sys.executable, "-m", module, "--port", str(port), "--log-format", "text", *args]
    environment = os.environ | {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"} | (env or {})
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)
    tree = Tree(port, process, log)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{module} exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).is_success:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{module} not ready in 300 s:\n{log.read_text()}")
            time.sleep(0.2)
        tree.roles = process_roles(process.pid)
        yield tree
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)


async def saturate(port: int, image: bytes, *, concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop over raw keep-alive connections: `concurrency` clients, `seconds` long."""
    payload = request_bytes("127.0.0.1", port, image, close=False)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                writer.write(payload)
                received = bytearray()
                while not complete(received):
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError("the server closed a keep-alive connection")
                    received += chunk
                status = int(bytes(received).split(b" ", 2)[1])
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    ok = statuses.get(200, 0)
    return {
        "requests_per_s": ok / elapsed,
        "statuses": statuses,
        "p50_ms": 1e3 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)) if latencies else None,
        "ok": ok,
    }


def _measured(tree: Tree, image: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    """Warm up, then saturate, reading every role's CPU around the measured window."""
    asyncio.run(saturate(tree.port, image, concurrency=concurrency, seconds=1.0))
    before = {role: [cpu_seconds(p) for p in pids] for role, pids in tree.roles.items()}
    result = asyncio.run(saturate(tree.port, image, concurrency=concurrency, seconds=seconds))
    after = {role: [cpu_seconds(p) for p in pids] for role, pids in tree.roles.items()}
    ok = max(result["ok"], 1)
    result["cpu_ms_per_request"] = {
        role: 1e3 * (sum(after[role]) - sum(before[role])) / ok for role in tree.roles
    }
    return result


def noop(image: bytes, *, latency_ms: float, seconds: float, repeats: int) -> dict[str, Any]:
    """The process layout with a sleeping model: 1 and 2 front ends, alternating."""
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    # The engine's host work as on a GPU host (stack the crops; normalised on the device).
    env = {"HIERA_BENCH_LATENCY_MS": str(latency_ms), "HIERA_BENCH_FEED": "copy"}
    for _ in range(repeats):
        for fronts in runs:
            args = [
                "--engine", "process", "--workers", str(fronts), "--weights", "random",
                "--device", "cpu", "--max-batch-size", "64", "--max-queue-size", "4096",
                "--max-delay-ms", "2",
            ]  # fmt: skip
            with serve("bench.split_server", args, env) as tree:
                runs[fronts].append(_measured(tree, image, 32 * fronts, seconds))
    summary = {}
    for fronts, samples in runs.items():
        front_ms = statistics.median(s["cpu_ms_per_request"]["worker"] for s in samples)
        engine_ms = statistics.median(s["cpu_ms_per_request"]["engine"] for s in samples)
        summary[str(fronts)] = {
            "requests_per_s": statistics.median(s["requests_per_s"] for s in samples),
            "front_end_cpu_ms_per_request": front_ms,
            "engine_cpu_ms_per_request": engine_ms,
        }
    # A 16-core host with one engine: 15 front ends, each a core; the engine one core.
    one = summary["1"]
    per_front = 1e3 / one["front_end_cpu_ms_per_request"]
    per_engine = 1e3 / one["engine_cpu_ms_per_request"]
    projection = {
        "cores": 16,
        "front_ends": 15,
        "front_ends_req_per_s": 15 * per_front,
        "engine_req_per_s": per_engine,
        "req_per_s": min(15 * per_front, per_engine),
    }
    return {
        "latency_ms": latency_ms,
        "runs": runs,
        "summary": summary,
        "projection_16_cores": projection,
    }


def model(
    repository: Path, image: bytes, *, seconds: float, repeats: int, concurrency: int
) -> dict[str, Any]:
    """The real model on this CPU at saturation: inline and process layouts, alternating."""
    runs: dict[str, list[dict[str, Any]]] = {"inline": [], "process": []}
    for _ in range(repeats):
        for layout in runs:
            args = ["--model-repository", str(repository), "--device", "cpu", "--engine", layout]
            with serve("service.cli", args) as tree:
                run = _measured(tree, image, concurrency, seconds)
                alone = asyncio.run(saturate(tree.port, image, concurrency=1, seconds=seconds / 2))
                runs[layout].append(run | {"one_client_p50_ms": alone["p50_ms"]})
    medians = {k: statistics.median(s["requests_per_s"] for s in v) for k, v in runs.items()}
    slices = [
        p["requests_per_s"] / i["requests_per_s"]
        for i, p in zip(runs["inline"], runs["process"], strict=True)
    ]
    return {
        "concurrency": concurrency,
        "runs": runs,
        "images_per_s": medians,
        "one_client_p50_ms": {
            k: statistics.median(s["one_client_p50_ms"] for s in v) for k, v in runs.items()
        },
        "process_over_inline": statistics.median(slices),
        "ratio_per_round": slices,
    }


def memory(repository: Path, image: bytes) -> dict[str, Any]:
    """PSS of every process of `--workers 2`, inline (two models) and process (one)."""
    result = {}
    for layout in ("inline", "process"):
        args = ["--model-repository", str(repository), "--device", "cpu", "--engine", layout,
                "--workers", "2"]  # fmt: skip
        with serve("service.cli", args) as tree:
            asyncio.run(saturate(tree.port, image, concurrency=4, seconds=2.0))
            roles = {
                role: [round(pss_mib(p), 1) for p in pids] for role, pids in tree.roles.items()
            }
        result[layout] = {"pss_mib": roles, "total_mib": round(sum(map(sum, roles.values())), 1)}
    return result


async def _drive_corridor(
    path: Path, engine_pid: int, rate: float, seconds: float
) -> dict[str, Any]:
    """Submit at `rate` through the corridor to an engine that answers at once (no batcher,
    no model), and to a no-op; the difference in CPU is what the corridor costs each side."""
    from service.engine.client import ProcessEngine
    from service.engine.state import Want
    from service.settings import Settings

    settings = Settings(weights="random", engine="process", engine_socket=path)
    remote = ProcessEngine(settings)
    await remote.load()
    assert remote.card is not None
    # As a front end does once started (service.cli): its long-lived objects, here the
    # bench's own torch and numpy, are never scanned by the collector again.
    gc.collect()
    gc.freeze()
    height, width = remote.card.preprocessing.input_size
    crop = np.random.default_rng(0).integers(0, 256, (3, height, width), dtype=np.uint8)
    want = Want(top_k=5, embedding=True)

    async def nothing(*_: Any) -> None:
        return None

    async def through_slot(crop: np.ndarray, deadline: float, want: Want) -> Any:
        # As a front end serves an upload: the crop decoded into a reserved slot (the decoder
        # writes it there, instead of into an array of its own), then submitted in place.
        slot = await remote.reserve()
        return await remote.submit(slot, deadline, want)

    async def window(submit: Any) -> tuple[float, float, int]:
        # Paced by timers set up front: each one's callback only starts a task, so the
        # client's own cost per image (what the idle window subtracts) stays small.
        loop = asyncio.get_running_loop()
        count, running = int(rate * seconds), set()
        done = loop.create_future()

        def finished(task: asyncio.Task[Any]) -> None:
            running.discard(task)
            if not running and not timers and not done.done():
                done.set_result(None)

        def start() -> None:
            timers.pop()
            task = loop.create_task(submit(crop, time.monotonic() + 30, want))
            running.add(task)
            task.add_done_callback(finished)

        mine, theirs = time.process_time(), cpu_seconds(engine_pid)
        began = loop.time() + 0.005
        timers = [loop.call_at(began + i / rate, start) for i in range(count)]
        await done
        return time.process_time() - mine, cpu_seconds(engine_pid) - theirs, count

    await window(through_slot)  # warm: slots touched, code paths taken
    rounds = []
    for _ in range(_CORRIDOR_ROUNDS):  # alternating: both kinds of window share the host's moods
        idle_mine, idle_engine, _ = await window(nothing)
        busy_mine, busy_engine, images = await window(through_slot)
        rounds.append(
            (1e6 * (busy_mine - idle_mine) / images, 1e6 * (busy_engine - idle_engine) / images)
        )
    await remote.close(time.monotonic() + 5)
    return {
        "rate_per_s": rate,
        "images_per_round": int(rate * seconds),
        "front_end_us_per_image": statistics.median(r[0] for r in rounds),
        "engine_us_per_image": statistics.median(r[1] for r in rounds),
        "rounds": rounds,
        "note": "CPU per image above a client loop that submits nothing; the engine answers "
        "each input at once with fixed outputs (top 5 and the embedding written to the slot)",
    }


def corridor(*, rate: float, seconds: float) -> dict[str, Any]:
    """The transport's CPU per image in each process, at `rate` images per second."""
    folder = Path(tempfile.mkdtemp(prefix="hiera-corridor-"))
    path = folder / "engine.sock"
    metrics = folder / "metrics"
    metrics.mkdir()
    env = os.environ | {
        "PROMETHEUS_MULTIPROC_DIR": str(metrics), "HIERA_BENCH_LATENCY_MS": "0",
        "HIERA_BENCH_ENGINE": "echo",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    from service.settings import Settings

    settings = Settings(
        weights="random", device="cpu", max_batch_size=64, max_queue_size=4096, log_level="warning"
    )
    command = [sys.executable, "-m", "bench.noop_engine", "--socket", str(path),
               "--settings", settings.model_dump_json(exclude={"api_keys"})]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    try:
        # On uvloop, the loop a front end serves on (uvicorn's loop="auto").
        import uvloop

        return uvloop.run(_drive_corridor(path, process.pid, rate, seconds))
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def print_table(report: dict[str, Any]) -> None:
    """Print the measurements as Markdown."""
    lines = []
    if part := report.get("noop"):
        lines += [
            f"\nno-op engine (sleep {part['latency_ms']} ms), process layout:",
            "| front ends | req/s | front-end CPU ms/req | engine CPU ms/req |",
            "|---|---|---|---|",
        ]
        for fronts, s in part["summary"].items():
            rate, front = s["requests_per_s"], s["front_end_cpu_ms_per_request"]
            lines.append(
                f"| {fronts} | {rate:.0f} | {front:.2f} | {s['engine_cpu_ms_per_request']:.3f} |"
            )
        p = part["projection_16_cores"]
        lines.append(
            f"projected on 16 cores (15 front ends + 1 engine): {p['req_per_s']:.0f} req/s "
            f"(front ends {p['front_ends_req_per_s']:.0f}, engine {p['engine_req_per_s']:.0f})"
        )
    if part := report.get("model"):
        m, ratio, one = part["images_per_s"], part["process_over_inline"], part["one_client_p50_ms"]
        lines.append(
            f"real model at saturation: inline {m['inline']:.1f} img/s, "
            f"process {m['process']:.1f} img/s, process/inline {ratio:.3f}; one client p50 "
            f"inline {one['inline']:.1f} ms, process {one['process']:.1f} ms"
        )
    for layout, mem in (report.get("memory") or {}).items():
        lines.append(
            f"--workers 2 --engine {layout}: {mem['total_mib']:.0f} MiB PSS {mem['pss_mib']}"
        )
    if c := report.get("corridor"):
        front, engine = c["front_end_us_per_image"], c["engine_us_per_image"]
        lines.append(
            f"corridor at {c['rate_per_s']:.0f} img/s: front end {front:.1f} us/img, "
            f"engine {engine:.1f} us/img (median of {len(c['rounds'])} rounds)"
        )
    print("\n".join(lines))
