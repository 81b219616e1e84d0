"""A real `hiera-serve` process whose model fails, stalls or hangs on command (tests only).

`python -m tests.service.fault_server <hiera-serve flags>` serves exactly as `hiera-serve`
does, except that every model instance is wrapped in a `CommandedBackend`. A test steers it by
writing one JSON command to the file named by FAULT_CONTROL_FILE, which every batch reads:

    {"seq": 1, "fail": 2}         the next 2 batches raise (transient), then all is well
    {"seq": 2, "sticky": true}    every batch raises
    {"seq": 3, "delay_s": 0.8}    every batch takes 0.8 s longer (a slow model)
    {"seq": 4, "hang_s": 30}      every batch blocks for 30 s (a hung CUDA call)

`seq` tells a new command from the one already applied, so "the next 2" counts from the moment
the command is written. No production module knows about any of this: the wrapping happens
here, by replacing the load plan the service imports, before the server starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONTROL_ENV = "FAULT_CONTROL_FILE"
# Internals a client must never see in an answer: the tests look for it.
SECRET = "CUDA error: out of memory at 0x7f3a (secret internals)"


@dataclass(frozen=True)
class Command:
    seq: int = 0
    fail: int = 0
    sticky: bool = False
    delay_s: float = 0.0
    hang_s: float = 0.0


def write_command(path: Path, **fields: Any) -> None:
    """Replace the control file in one step (rename), so a batch never reads half a command."""
    previous = read_command(path).seq
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps({"seq": previous + 1, **fields}))
    staging.replace(path)


def read_command(path: Path) -> Command:
    try:
        return Command(**json.loads(path.read_text()))
    except FileNotFoundError:
        return Command()


class CommandedBackend:
    """Wrap a backend: read the command before each batch, then fail, stall, hang or run."""

    def __init__(self, inner: Any, control: Path) -> None:
        self.inner = inner
        self._control = control
        self._applied = read_command(control).seq  # commands written before start are ignored
        self._fail_left = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        # name, device, precision, provider, input_dtype, stream: whatever the pool asks.
        return getattr(self.inner, name)

    def infer(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        command = read_command(self._control)
        with self._lock:
            if command.seq != self._applied:
                self._applied = command.seq
                self._fail_left = command.fail
            failing = command.sticky or self._fail_left > 0
            if self._fail_left > 0:
                self._fail_left -= 1
        if command.hang_s:
            time.sleep(command.hang_s)
        if command.delay_s:
            time.sleep(command.delay_s)
        if failing:
            raise RuntimeError(SECRET)
        result: tuple[np.ndarray, np.ndarray] = self.inner.infer(batch)
        return result

    def close(self) -> None:
        self.inner.close()


def install(control: Path) -> None:
    """Make the service wrap every instance it loads in a CommandedBackend."""
    import service.engine.core
    from service.runtime.loader import BackendFactory, LoadPlan
    from service.settings import Settings

    real_plan = service.engine.core.plan

    def wrapped(factory: BackendFactory) -> BackendFactory:
        return lambda: CommandedBackend(factory(), control)  # type: ignore[return-value]

    def commanded_plan(settings: Settings) -> LoadPlan:
        load_plan = real_plan(settings)
        load_plan.instances = [(device, wrapped(f)) for device, f in load_plan.instances]
        return load_plan

    service.engine.core.plan = commanded_plan  # type: ignore[assignment]
    # With --engine process, the model loads in engine processes: they run the same wrapping.
    import service.workers

    service.workers.ENGINE_MODULE = "tests.service.fault_engine"


@dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen[bytes]
    control: Path
    log: Path

    def command(self, **fields: Any) -> None:
        write_command(self.control, **fields)


@contextlib.contextmanager
def commanded_server(repository: Path, tmp_path: Path, *args: str) -> Iterator[Server]:
    """Run this module as a real server on a free port; yield it once /health/ready is 200."""
    from tests.service.helpers import ready_process

    log, control = tmp_path / "server.log", tmp_path / "faults.json"
    module = "tests.service.fault_server"
    args = ("--log-format", "text", *args)
    with ready_process(module, repository, log, *args, env={CONTROL_ENV: str(control)}) as (
        url,
        process,
    ):
        yield Server(url, process, control, log)


def main() -> int:
    from service.cli import serve_main

    install(Path(os.environ[CONTROL_ENV]))
    return serve_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
