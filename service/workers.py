"""`--workers N`: a small supervisor that runs N server processes on one port.

With `--engine process` (the default on a GPU host) the supervisor first starts one engine
process per GPU (one for the CPU instances on a CPU-only host: service.engine.process), which
loads the model; the N server processes are then front ends that load no model and reach
an engine over its Unix socket (worker i the engine i mod G). SIGTERM drains the front ends
first, then the engines. An engine that dies is restarted like a worker; meanwhile every front
end answers 503 with Retry-After.

Each worker is a fresh interpreter (`python -m service.workers`) with its own event loop,
batcher and model instances, and its own listening socket bound with SO_REUSEPORT, so the
kernel spreads new connections evenly over the workers (a shared, inherited socket lets the
first worker to wake accept a whole burst, which would overload one GPU's batcher). The
supervisor holds a bound, non-listening socket on the port so it stays reserved while a
worker restarts, gives worker i its own GPUs through CUDA_VISIBLE_DEVICES, points every worker
at one private PROMETHEUS_MULTIPROC_DIR, forwards SIGTERM so each worker drains, and:

- exits 1 (after stopping the others) when a worker cannot load its model;
- restarts a worker that dies after loading, unless it keeps dying (then exits 1);
- marks a dead worker's live gauges dead, so readiness reads "N-1 of N workers ready"
  until its replacement is ready.
"""

from __future__ import annotations

import argparse
import collections
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from service.settings import Settings

log = logging.getLogger(__name__)

_KEYS_ENV = "HIERA_WORKER_API_KEYS"
LOAD_FAILED = 3  # a worker's exit status when its model could not be loaded
RESTARTS_PER_MINUTE = 3  # a worker dying more often than this is a crash loop: give up
ENGINE_MODULE = "service.engine.process"  # what an engine process runs (`python -m`)
KILL_GRACE_S = 15.0  # beyond the drain timeout, before a worker that ignores SIGTERM is killed


def assign_devices(visible: Sequence[str], workers: int) -> list[list[str]]:
    """Split the visible GPUs over the workers round-robin; with fewer GPUs, workers share."""
    if not visible:
        return [[] for _ in range(workers)]
    if workers <= len(visible):
        return [list(visible[i::workers]) for i in range(workers)]
    return [[visible[i % len(visible)]] for i in range(workers)]


def visible_gpus(settings: Settings) -> list[str]:
    """Return the CUDA device ids this process sees, as CUDA_VISIBLE_DEVICES would name them."""
    if settings.device == "cpu" or not glob.glob("/dev/nvidia[0-9]*"):
        return []  # no NVIDIA device node: no GPU to look for
    # Asked of torch in a child, so that the supervisor itself never holds torch (~0.5 GB).
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    count = int(done.stdout.strip() or 0) if done.returncode == 0 else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [token.strip() for token in listed.split(",") if token.strip()][:count]


def bind_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    """Bind host:port with SO_REUSEPORT; listen only in a worker."""
    reuse_port = getattr(socket, "SO_REUSEPORT", None)
    if reuse_port is None:
        raise OSError("--workers > 1 needs SO_REUSEPORT (Linux, macOS, BSD)")
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Worker:
    index: int
    devices: list[str]
    process: subprocess.Popen[bytes] | None = None
    deaths: collections.deque[float] = field(default_factory=collections.deque)
    # An engine process (the model's owner) or a worker; a worker with an engine socket is a
    # front end that reaches that engine.
    engine: bool = False
    engine_socket: str | None = None

    @property
    def name(self) -> str:
        return f"engine {self.index}" if self.engine else f"worker {self.index}"


@dataclass(frozen=True)
class Layout:
    """Which processes to run: workers (with their GPUs), and engines when they are split."""

    workers: list[list[str]]
    engines: list[list[str]]  # empty: every worker holds its own model (--engine inline)


def runs_engines(settings: Settings) -> bool:
    """Whether the model runs in engine processes (which a supervisor starts) on this host."""
    if settings.engine == "auto" and settings.engine_socket is None:
        return bool(visible_gpus(settings))
    return settings.engine == "process"


def plan_layout(settings: Settings, gpus: Sequence[str]) -> Layout:
    """Resolve --engine and the number of workers for this host's GPUs and cores."""
    process = settings.engine == "process" or (settings.engine == "auto" and bool(gpus))
    if not process:
        return Layout(assign_devices(gpus, settings.workers), [])
    engines = [[gpu] for gpu in gpus] or [[]]
    workers = settings.workers
    if "workers" not in settings.model_fields_set:
        # Every core but one per engine serves HTTP and decodes.
        from service.settings import available_cores

        workers = min(64, max(1, available_cores() - len(engines)))
    return Layout([[] for _ in range(workers)], engines)


class Supervisor:
    """Start, watch, restart and stop the worker processes."""

    def __init__(
        self,
        settings: Settings,
        metrics_dir: str,
        devices: list[list[str]],
        *,
        engines: Sequence[list[str]] = (),
        socket_dir: str | None = None,
    ) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.engines = [
            _Worker(
                i, d, engine=True, engine_socket=os.path.join(socket_dir or "", f"engine-{i}.sock")
            )
            for i, d in enumerate(engines)
        ]
        self.workers = [
            _Worker(
                i, d,
                engine_socket=self.engines[i % len(self.engines)].engine_socket
                if self.engines else None,
            )
            for i, d in enumerate(devices)
        ]  # fmt: skip
        self._engines_stopped = False
        self.stopping = False
        self.failed = False
        self._stop_deadline = float("inf")

    def run(self) -> int:
        """Start every worker and supervise them until stopped; return the exit status."""
        for worker in self.engines + self.workers:  # engines first: they load the model
            self._start(worker)
        while True:
            for worker in self.engines + self.workers:
                self._check(worker)
            fronts = [w.process for w in self.workers if w.process and w.process.poll() is None]
            if self.stopping and not fronts and not self._engines_stopped:
                # The front ends have drained (their requests are answered): now the engines.
                self._engines_stopped = True
                for engine in self.engines:
                    if engine.process is not None and engine.process.poll() is None:
                        engine.process.send_signal(signal.SIGTERM)
            alive = fronts + [
                e.process for e in self.engines if e.process and e.process.poll() is None
            ]
            if self.stopping and not alive:
                return 1 if self.failed else 0
            if self.stopping and time.monotonic() > self._stop_deadline:
                for process in alive:
                    log.error("worker pid %d did not drain in time; killing it", process.pid)
                    process.kill()
                self._stop_deadline = float("inf")
            time.sleep(0.1)

    def stop(self, *_: Any) -> None:
        """Forward SIGTERM to every worker so each drains; the run loop then waits for them
        (and then stops the engines)."""
        if not self.stopping:
            self.stopping = True
            # Front ends drain, then engines: twice the drain timeout at most, plus the grace.
            drains = 2 if self.engines else 1
            self._stop_deadline = (
                time.monotonic() + drains * self.settings.drain_timeout_s + KILL_GRACE_S
            )
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    def kill_all(self) -> None:
        """Kill workers still running (used only when the supervisor itself is failing)."""
        for worker in self.workers + self.engines:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()

    def _start(self, worker: _Worker) -> None:
        if self.stopping:  # SIGTERM arrived while the workers were being started
            return
        env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        # Keys travel in the environment, never on a command line that `ps` shows.
        env[_KEYS_ENV] = ",".join(k.get_secret_value() for k in self.settings.api_keys)
        if worker.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(worker.devices)
        elif worker.engine_socket is not None and not worker.engine:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a front end has no business on a GPU
        settings = self.settings
        if worker.engine_socket is not None:
            socket_path = Path(worker.engine_socket)
            settings = settings.model_copy(
                update={"engine": "process", "engine_socket": socket_path}
            )
        if worker.engine:
            assert worker.engine_socket is not None
            command = [
                sys.executable, "-m", ENGINE_MODULE, "--socket", worker.engine_socket,
                "--settings", settings.model_dump_json(exclude={"api_keys"}),
            ]  # fmt: skip
        else:
            command = [
                sys.executable, "-m", "service.workers", "--index", str(worker.index),
                "--settings", settings.model_dump_json(exclude={"api_keys"}),
            ]  # fmt: skip
        worker.process = subprocess.Popen(command, env=env)
        where = f"GPUs {','.join(worker.devices)}" if worker.devices else self.settings.device
        if worker.engine_socket is not None and not worker.engine:
            where = f"front end of {Path(worker.engine_socket).stem}"
        log.info("%s started (pid %d, %s)", worker.name, worker.process.pid, where)

    def _check(self, worker: _Worker) -> None:
        process = worker.process
        if process is None or (status := process.poll()) is None:
            return
        worker.process = None
        from prometheus_client.multiprocess import mark_process_dead

        # Its live gauges (ready, queue depth, in flight) leave the sums; counters stay.
        mark_process_dead(process.pid, self.metrics_dir)
        if self.stopping:
            if status != 0:
                log.error("%s (pid %d) exited with %d", worker.name, process.pid, status)
                self.failed = True
            return
        if status == LOAD_FAILED:
            log.error("%s could not load the model; stopping all workers", worker.name)
            self._give_up()
            return
        now = time.monotonic()
        worker.deaths.append(now)
        while worker.deaths and worker.deaths[0] < now - 60:
            worker.deaths.popleft()
        if len(worker.deaths) > RESTARTS_PER_MINUTE:
            deaths = len(worker.deaths)
            log.error("%s died %d times in a minute; stopping", worker.name, deaths)
            self._give_up()
            return
        log.error(
            "%s (pid %d) died with status %d; restarting it (readiness is false until "
            "it is ready)", worker.name, process.pid, status,
        )  # fmt: skip
        self._start(worker)

    def _give_up(self) -> None:
        self.failed = True
        self.stop()


def supervise(settings: Settings) -> int:
    """Run `settings.workers` worker processes on one port until SIGTERM; return exit status."""
    try:
        reserved = bind_socket(settings.host, settings.port, listen=False)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", settings.host, settings.port, exc)
        return 1
    port = reserved.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="hiera-metrics-")
    socket_dir = tempfile.mkdtemp(prefix="hiera-engine-")
    supervisor: Supervisor | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):  # no worker yet: just clean up and leave
        signal.signal(sig, _exit_now)
    try:
        settings = settings.model_copy(update={"port": port})
        layout = plan_layout(settings, visible_gpus(settings))
        if len(layout.engines) != 1:  # one engine exports for itself; N would race
            settings = _prepare(settings)
        settings = settings.model_copy(update={"workers": len(layout.workers)})
        supervisor = Supervisor(
            settings, metrics_dir, layout.workers, engines=layout.engines, socket_dir=socket_dir
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, supervisor.stop)
        engines = f" and {len(layout.engines)} engine process(es)" if layout.engines else ""
        log.info(
            "serving on %s:%d with %d workers%s (metrics files in %s)",
            settings.host, port, settings.workers, engines, metrics_dir,
        )  # fmt: skip
        return supervisor.run()
    except Exception as exc:
        log.error("cannot start the workers: %s", exc)
        return 1
    finally:
        if supervisor is not None:
            supervisor.kill_all()
        reserved.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)


def _exit_now(*_: Any) -> None:
    raise SystemExit(0)


def _prepare(settings: Settings) -> Settings:
    """Export an on-the-fly model once, here, so N workers do not race to write one folder."""
    if settings.model_repository is not None or settings.backend == "eager":
        return settings
    from service.runtime.loader import export_on_the_fly

    repository, _ = export_on_the_fly(settings)
    return settings.model_copy(update={"model_repository": repository.path})


def run_worker(argv: Sequence[str] | None = None) -> int:
    """Serve as worker `--index` on a SO_REUSEPORT socket; exit LOAD_FAILED if loading fails."""
    parser = argparse.ArgumentParser(prog="hiera-serve worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--settings", required=True, help="Settings as JSON")
    args = parser.parse_args(argv)
    settings = Settings.model_validate_json(args.settings)
    settings = settings.model_copy(update={"api_keys": _keys_from_env()})

    from service.cli import serve
    from service.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    exit_with_parent(os.getppid())
    sock = bind_socket(settings.host, settings.port, listen=True)
    # One worker serves the separate metrics port; its registry already sums every worker.
    failed = serve(settings, sock, exit_when_broken=True, metrics_listener=args.index == 0)
    return LOAD_FAILED if failed else 0


def _keys_from_env() -> list[SecretStr]:
    keys = os.environ.pop(_KEYS_ENV, "")
    return [SecretStr(k) for k in keys.split(",") if k]


def exit_with_parent(parent: int) -> None:
    """Drain and exit if the supervisor disappears, instead of serving on as an orphan."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="hiera-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(run_worker())
