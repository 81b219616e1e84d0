"""Thread priority: the event loop outranks the threads that decode images and run models.

On a CPU the model's threads can take every core. The event loop's work per request is small
(parse, admit or refuse, answer), but if it waits its turn behind the model, a refusal that
costs a millisecond of CPU still takes hundreds of milliseconds to arrive. Linux lets one
thread be nicer than the others: the worker threads get a higher nice value, so the scheduler
runs the event loop first when both want a core. Threads they start (ONNX Runtime's intra-op
pool, created with the session on the instance's thread) inherit it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def lower_priority(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness` (Linux only; 0 leaves it alone)."""
    if niceness <= 0 or sys.platform != "linux":
        return  # elsewhere setpriority(PRIO_PROCESS, ...) would renice the whole process
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))
    except OSError as exc:  # e.g. a seccomp profile that forbids it: serve anyway
        log.warning("could not lower the priority of thread %s: %s", thread, exc)
