"""A pool of model instances, each driven by its own worker thread.

The event loop never runs a model: `infer` takes the next free instance, hands the batch to
that instance's single thread, and awaits the result. Several batches run at once, one per
instance, and a free-instance queue decides who goes next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.runtime.base import Backend
from service.runtime.loader import BackendFactory

log = logging.getLogger(__name__)


@dataclass
class Instance:
    """One backend and the only thread allowed to touch it."""

    index: int
    device: str
    backend: Backend
    thread: ThreadPoolExecutor
    batches: int = 0


class RuntimePool:
    """Run batches on whichever instance is free; built and warmed by `start`."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        if not instances:
            raise ValueError("a runtime pool needs at least one instance")
        self.instances = list(instances)
        self._free: asyncio.Queue[Instance] = asyncio.Queue()
        for instance in self.instances:
            self._free.put_nowait(instance)

    @classmethod
    async def start(
        cls,
        factories: Sequence[tuple[str, BackendFactory]],
        *,
        warmup_batch: np.ndarray,
        max_batch_size: int,
    ) -> RuntimePool:
        """Create every instance in its own thread and warm it at every batch size."""
        instances = []
        try:
            for index, (device, factory) in enumerate(factories):
                thread = ThreadPoolExecutor(1, thread_name_prefix=f"hiera-infer-{index}")
                try:
                    backend = await asyncio.wrap_future(thread.submit(factory))
                except BaseException:
                    thread.shutdown(wait=False)
                    raise
                instance = Instance(index, device, backend, thread)
                instances.append(instance)
                seconds = await asyncio.wrap_future(
                    thread.submit(_warm_up, backend, warmup_batch, max_batch_size)
                )
                log.info(
                    "instance %d (%s on %s, %s) warmed at batch sizes 1..%d in %.2f s",
                    index,
                    backend.name,
                    device,
                    backend.precision,
                    max_batch_size,
                    seconds,
                )
        except BaseException:
            _close_all(instances)
            raise
        return cls(instances)

    @property
    def size(self) -> int:
        return len(self.instances)

    async def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run `batch` on the next free instance's thread."""
        instance = await self._free.get()
        try:
            future = instance.thread.submit(instance.backend.infer, batch)
            result = await asyncio.wrap_future(future)
            instance.batches += 1
            return result
        finally:
            self._free.put_nowait(instance)

    async def close(self) -> None:
        """Release every instance once its thread has finished the batch it is running."""
        await asyncio.to_thread(_close_all, self.instances)


def _warm_up(backend: Backend, sample: np.ndarray, max_batch_size: int) -> float:
    # Every batch size the batcher can send: allocators, ORT's per-shape plans and cuDNN
    # autotuning then happen here instead of inside a client's first request.
    started = time.perf_counter()
    for size in range(1, max_batch_size + 1):
        batch = np.repeat(sample[None], size, axis=0)  # a writable copy, like real batches
        backend.infer(batch)
    return time.perf_counter() - started


def _close_all(instances: Sequence[Instance]) -> None:
    for instance in instances:
        instance.thread.shutdown(wait=True)
        try:
            instance.backend.close()
        except Exception:
            log.exception("closing instance %d failed", instance.index)
