"""Worker threads run at a lower priority than the event loop (Linux)."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.app import create_app
from service.runtime.threads import lower_priority
from tests.service.helpers import repository_settings, running

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_only_the_calling_thread_gets_nicer() -> None:
    before = _nice()
    with ThreadPoolExecutor(1, initializer=lower_priority, initargs=(5,)) as pool:
        worker = pool.submit(_nice).result()
        # A thread the worker starts (as ONNX Runtime starts its pool) inherits the value.
        inherited: list[int] = []
        pool.submit(lambda: _started_thread_nice(inherited)).result()
    assert worker == min(19, before + 5)
    assert inherited == [worker]
    assert _nice() == before  # the event loop's thread (here: the test's) is untouched


def _started_thread_nice(out: list[int]) -> None:
    thread = threading.Thread(target=lambda: out.append(_nice()))
    thread.start()
    thread.join()


def test_zero_leaves_the_priority_alone() -> None:
    before = _nice()
    with ThreadPoolExecutor(1, initializer=lower_priority, initargs=(0,)) as pool:
        assert pool.submit(_nice).result() == before


async def test_the_service_runs_decode_and_inference_threads_nicer(micro_repository: Path) -> None:
    base = _nice()
    app = create_app(repository_settings(micro_repository, thread_niceness=3))
    async with running(app):
        service = app.state.service
        infer = service.pool.instances[0].thread.submit(_nice).result()
        decode = service._decoder.submit(_nice).result()
    assert infer == decode == min(19, base + 3)
