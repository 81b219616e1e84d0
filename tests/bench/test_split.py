"""hiera-bench --split's process bookkeeping, on real process trees."""

from __future__ import annotations

import os
import subprocess
import time

from bench.split import cpu_seconds, process_roles, pss_mib


def test_a_process_tree_is_sorted_into_supervisor_engine_and_workers() -> None:
    # A parent whose children carry the command lines of an engine and a worker.
    script = (
        "(exec -a 'python -m service.engine.process --socket x' sleep 30) & "
        "(exec -a 'python -m service.workers --index 0' sleep 30) & "
        "(exec -a 'python -m service.workers --index 1' sleep 30) & wait"
    )
    tree = subprocess.Popen(["bash", "-c", script])
    try:
        deadline = time.monotonic() + 10
        while True:
            roles = process_roles(tree.pid)
            if (len(roles["worker"]) == 2 and roles["engine"]) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert roles["supervisor"] == [tree.pid]
        assert len(roles["engine"]) == 1 and len(roles["worker"]) == 2
        assert not set(roles["engine"]) & set(roles["worker"])
    finally:
        tree.kill()
        tree.wait()
    alone = process_roles(os.getpid())  # pytest's own children, if any, are not ours
    assert os.getpid() in alone["worker"] + alone["supervisor"]


def test_cpu_and_memory_readings_of_this_process() -> None:
    before = cpu_seconds(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert cpu_seconds(os.getpid()) >= before + 0.03
    assert pss_mib(os.getpid()) > 10
    assert cpu_seconds(2**22 + 12345) == 0.0  # no such process
