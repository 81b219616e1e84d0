"""`hiera-serve --engine process` as a real process tree: front ends, an engine, the corridor.

A supervisor starts one engine process (the model's only copy) and two front ends sharing the
port. The tests send real HTTP, read real /metrics scrapes, and kill, stop and hang real
processes: answers equal the in-process layout's, front ends hold no model, and every request
gets one answer, quickly, whatever dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests.service.fault_server import CONTROL_ENV, write_command
from tests.service.helpers import free_port, make_image, repository_settings, running

pytestmark = pytest.mark.slow

JPEG = {"Content-Type": "image/jpeg"}
OUTCOMES = ("ok", "rejected", "invalid", "cancelled", "timed_out", "failed")


@dataclass
class Tree:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    control: Path

    def pids(self, role: str) -> list[int]:
        """Every pid the supervisor started for `role` ("engine" or "worker"), oldest first."""
        pattern = rf"{role} \d+ started \(pid (\d+)"
        return [int(m.group(1)) for m in re.finditer(pattern, self.log.read_text())]

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def poll(check: Callable[[], bool], what: str, tree: Tree, within_s: float = 90.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, (
            f"{what} not seen in {within_s} s:\n{tree.log.read_text()}"
        )
        time.sleep(0.05)


@contextlib.contextmanager
def process_tree(
    repository: Path, tmp_path: Path, *args: str, faults: bool = False
) -> Iterator[Tree]:
    """Run the supervisor (through the fault server if `faults`) with --engine process."""
    port, log, control = free_port(), tmp_path / "server.log", tmp_path / "faults.json"
    module = "tests.service.fault_server" if faults else "service.cli"
    command = [
        sys.executable, "-m", module, "--model-repository", str(repository), "--port", str(port),
        "--device", "cpu", "--engine", "process", "--intra-op-threads", "1",
        "--decode-threads", "1", "--no-adaptive-layout", "--log-format", "text", *args,
    ]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", CONTROL_ENV: str(control)}
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    tree = Tree(f"http://127.0.0.1:{port}", process, log, control)
    try:
        poll(tree.ready, "readiness", tree)
        yield tree
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for pid in tree.pids("engine") + tree.pids("worker"):  # never leave children behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def maps_model_runtime(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps or "onnxruntime" in maps


def classify(url: str, seed: int, timeout: float = 20.0) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/classify?top_k=5", content=make_image(seed), headers=JPEG, timeout=timeout
    )


def test_split_layout_answers_like_inline_and_its_front_ends_hold_no_model(
    micro_repository: Path, tmp_path: Path
) -> None:
    with process_tree(micro_repository, tmp_path, "--workers", "2") as tree:
        images = [make_image(seed) for seed in range(6)]
        with httpx.Client(base_url=tree.url, timeout=30, headers=JPEG) as client:
            split_classes = [client.post("/v1/classify?top_k=5", content=i).json() for i in images]
            split_vectors = [
                client.post("/v1/embed?normalize=false", content=i).json() for i in images
            ]
            models = client.get("/v1/models").json()["models"][0]
        fronts, (engine,) = tree.pids("worker"), tree.pids("engine")
        assert len(fronts) == 2
        # Front ends never load torch or ONNX Runtime; the engine does.
        assert not any(maps_model_runtime(pid) for pid in fronts)
        assert maps_model_runtime(engine)
        assert models["engine"] == "process" and models["batching"]["capacity"] > 0
        # One scrape counts every process: the front ends' requests and the engine's batches.
        samples = tree.scrape()
        received = sum(v for (n, _), v in samples.items() if n == "hiera_requests_received_total")
        outcomes = Counter[str]()
        for (name, labels), count in samples.items():
            if name == "hiera_request_outcomes_total":
                outcomes[dict(labels)["outcome"]] += int(count)
        assert received == 12 == sum(outcomes[o] for o in OUTCOMES) == outcomes["ok"]
        batched = samples[("hiera_batch_size_sum", ())]
        assert batched == 12  # the engine's histogram, in the same scrape
        queue = samples[
            ("hiera_stage_duration_seconds_count", (("endpoint", "classify"), ("stage", "queue")))
        ]
        assert queue == 6
        tree.process.send_signal(signal.SIGTERM)
        assert tree.process.wait(60) == 0
        for pid in [*fronts, engine]:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )

    async def inline() -> tuple[list[dict], list[dict]]:
        app = create_app(repository_settings(micro_repository, adaptive_layout=False))
        async with running(app) as client:
            classes = [
                (await client.post("/v1/classify?top_k=5", content=i, headers=JPEG)).json()
                for i in images
            ]
            vectors = [
                (await client.post("/v1/embed?normalize=false", content=i, headers=JPEG)).json()
                for i in images
            ]
        return classes, vectors

    inline_classes, inline_vectors = asyncio.run(inline())
    for there, here in zip(split_classes, inline_classes, strict=True):
        assert [c["index"] for c in there["labels"]] == [c["index"] for c in here["labels"]]
        np.testing.assert_allclose(
            [c["score"] for c in there["labels"]], [c["score"] for c in here["labels"]], atol=1e-6
        )
    for there, here in zip(split_vectors, inline_vectors, strict=True):
        np.testing.assert_allclose(there["embedding"], here["embedding"], atol=1e-5)


class Load:
    """Clients in threads sending single-image requests until stopped; what each one saw."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.seen: list[tuple[int | str, float, str | None]] = []  # status, seconds, Retry-After
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, seed: int) -> None:
        image = make_image(seed)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                # A fresh connection each time, as a crowd of clients would open them.
                response = httpx.post(
                    f"{self.url}/v1/classify", content=image, headers=JPEG, timeout=20
                )
                status: int | str = response.status_code
                retry = response.headers.get("retry-after")
            except httpx.TransportError as exc:
                status, retry = type(exc).__name__, None
            self.seen.append((status, time.monotonic() - started, retry))

    def count(self, status: int | str) -> int:
        return sum(1 for s, _, _ in self.seen if s == status)


def test_killed_engine_and_front_end_cost_fast_503s_and_resets_never_hangs(
    micro_repository: Path, tmp_path: Path
) -> None:
    with process_tree(micro_repository, tmp_path, "--workers", "2") as tree:
        (engine,) = tree.pids("engine")
        with Load(tree.url, clients=6) as load:
            poll(lambda: load.count(200) >= 20, "answers before the kill", tree)
            os.kill(engine, signal.SIGKILL)
            poll(lambda: len(tree.pids("engine")) == 2, "the engine restarted", tree)
            poll(lambda: load.count(503) > 0, "503 while the engine is down", tree)
            poll(tree.ready, "readiness after the restart", tree)
            after_engine = len(load.seen)
            poll(lambda: load.count(200) >= 40, "answers after the restart", tree)
            front = tree.pids("worker")[0]
            os.kill(front, signal.SIGKILL)
            poll(lambda: len(tree.pids("worker")) == 3, "the front end restarted", tree)
            poll(tree.ready, "readiness after the front end's restart", tree)
            settled = len(load.seen)
            poll(lambda: len(load.seen) >= settled + 20, "answers after both restarts", tree)
        statuses = Counter(s for s, _, _ in load.seen)
        # Accepted requests got 200 or 503; only connections to the killed front end broke.
        assert set(statuses) <= {200, 503, "ConnectError", "RemoteProtocolError", "ReadError"}
        assert all(retry for s, _, retry in load.seen if s == 503)
        # Nothing waited out its deadline (30 s): the dead engine's requests failed at once.
        assert max(seconds for _, seconds, _ in load.seen) < 10
        assert all(s == 200 for s, _, _ in load.seen[-10:])
        broken = [s for s, _, _ in load.seen[:after_engine] if not isinstance(s, int)]
        assert not broken  # the engine's death never broke a connection
        log = tree.log.read_text()
        assert "engine process exited" in log and f"front end pid {front} disconnected" in log


def test_a_hung_engine_answers_503_within_seconds_and_is_replaced(
    micro_repository: Path, tmp_path: Path
) -> None:
    with process_tree(micro_repository, tmp_path, "--workers", "1") as tree:
        (engine,) = tree.pids("engine")
        assert classify(tree.url, 0).status_code == 200
        os.kill(engine, signal.SIGSTOP)  # alive, but never answers again
        started = time.monotonic()
        hung = classify(tree.url, 1, timeout=25)
        waited = time.monotonic() - started
        assert hung.status_code == 503 and hung.headers["retry-after"]
        assert waited < 8, waited  # the heartbeat gave it away, not the 30 s deadline
        assert not tree.ready()
        # A front end kills a hung engine; the supervisor starts another.
        poll(lambda: len(tree.pids("engine")) == 2, "a new engine", tree, within_s=60)
        poll(tree.ready, "readiness with the new engine", tree)
        assert classify(tree.url, 2).status_code == 200


def _send_request(url: str, body: bytes) -> socket.socket:
    """Send a whole request and return the connection, its answer unread."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_that_hangs_up_drops_its_image_in_the_engine_before_the_model(
    micro_repository: Path, tmp_path: Path
) -> None:
    with process_tree(
        micro_repository, tmp_path, "--workers", "1", "--max-batch-size", "1", faults=True
    ) as tree:
        before = tree.scrape()
        write_command(tree.control, delay_s=1.5)  # every batch takes 1.5 s longer
        first = threading.Thread(target=classify, args=(tree.url, 1))
        first.start()
        depth = ("hiera_queue_depth", ())
        poll(
            lambda: (
                tree.scrape()[("hiera_batch_size_count", ())]
                > before[("hiera_batch_size_count", ())]
            ),
            "the first batch",
            tree,
        )
        second = _send_request(tree.url, make_image(2))
        poll(
            lambda: tree.scrape().get(depth, 0) == 1, "the second image queued in the engine", tree
        )
        second.close()  # the client hangs up while its image waits in the engine
        cancelled = ("hiera_dropped_total", (("reason", "cancelled"),))
        poll(
            lambda: tree.scrape().get(cancelled, 0) == before.get(cancelled, 0) + 1,
            "the drop",
            tree,
        )
        first.join()
        write_command(tree.control, delay_s=0.0)
        after = tree.scrape()
        # One batch ran (the first image's); the second never reached the model.
        batches = ("hiera_batch_size_count", ())
        assert after[batches] - before[batches] == 1
        outcome = (
            "hiera_request_outcomes_total",
            (("endpoint", "classify"), ("outcome", "cancelled")),
        )
        assert after.get(outcome, 0) - before.get(outcome, 0) == 1


def test_two_front_ends_share_the_engines_capacity_under_overload(
    micro_repository: Path, tmp_path: Path
) -> None:
    # The batch cap fixed at 2: one taken from warm-up timings would follow the host's load.
    args = ("--workers", "2", "--max-batch-size", "2", "--max-queue-size", "6",
            "--no-batch-cap-from-warmup")  # fmt: skip
    with process_tree(micro_repository, tmp_path, *args, faults=True) as tree:
        with httpx.Client(base_url=tree.url) as client:
            capacity = client.get("/v1/models").json()["models"][0]["batching"]["capacity"]
        assert capacity == 8  # the queue and one batch of 2
        write_command(tree.control, delay_s=2.0)  # the room stays taken through the burst
        before = tree.scrape()

        async def burst() -> list[tuple[int, str | None]]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=tree.url, timeout=60, limits=limits) as client:
                answers = await asyncio.gather(
                    *(
                        client.post("/v1/classify", content=make_image(s), headers=JPEG)
                        for s in range(3 * capacity)
                    )
                )
            return [(a.status_code, a.headers.get("retry-after")) for a in answers]

        answers = asyncio.run(burst())
        write_command(tree.control, delay_s=0.0)
        statuses = Counter(s for s, _ in answers)
        assert set(statuses) <= {200, 429}
        assert all(retry for s, retry in answers if s == 429)
        # Both front ends took from one capacity: never more than it at once, and the rest
        # refused. Batches of 2 take 2 s, so the burst is over long before room frees.
        assert statuses[200] <= capacity and statuses[429] >= 2 * capacity
        after = tree.scrape()
        ran = after[("hiera_batch_size_sum", ())] - before[("hiera_batch_size_sum", ())]
        assert ran == statuses[200]  # every admitted image ran, and only those
        refused = ("hiera_requests_total", (("endpoint", "classify"), ("status", "429")))
        assert after.get(refused, 0) - before.get(refused, 0) == statuses[429]
