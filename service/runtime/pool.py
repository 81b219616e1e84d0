"""A pool of model instances, each driven by its own worker thread.

The event loop never runs a model: `infer` takes the next free instance, hands the batch to
that instance's single thread, and awaits the result. Several batches run at once, one per
instance, and the free instances are taken in turn.

A pool may also hold a *solo* instance, one that uses every core by itself (the adaptive CPU
layout, see `service.runtime.loader`). It runs a batch only when nothing else runs and nothing
waits behind it, i.e. when a request came alone: a split over every core answers it soonest.
When requests queue, the side-by-side instances take them, one core each, which keeps more of
the CPU busy. The two never run at once, so the cores are never oversubscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.postprocess import BatchOutputs
from service.runtime.base import Backend
from service.runtime.feed import Feeder
from service.runtime.loader import BackendFactory
from service.runtime.threads import lower_priority

log = logging.getLogger(__name__)

Outputs = tuple[np.ndarray, np.ndarray] | BatchOutputs


@dataclass(frozen=True)
class InputSpec:
    """What every instance is fed: the crop shape and the normalisation to apply to it."""

    shape: tuple[int, int, int]  # (3, H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class Instance:
    """One backend, the feeder that prepares its batches, and the only thread touching both."""

    index: int
    device: str
    backend: Backend
    feeder: Feeder
    thread: ThreadPoolExecutor
    batches: int = 0
    busy_since: float | None = None  # monotonic start of the running batch, for the watchdog

    def run(self, items: Sequence[Any], logits: bool = True) -> Outputs:
        """Assemble the batch on this instance's device and run it; called on `thread`.

        A backend that postprocesses on its device returns the batch's BatchOutputs, with the
        logits only if `logits` (some item asked for them); others return (logits, embedding).
        """
        batch = self.feeder(items)
        if getattr(self.backend, "device_top_k", None) is not None:
            return self.backend.infer_outputs(batch, logits=logits)  # type: ignore[attr-defined]
        return self.backend.infer(batch)


class RuntimePool:
    """Run batches on whichever instance is free; built and warmed by `start`."""

    def __init__(
        self,
        instances: Sequence[Instance],
        per_image_seconds: dict[int, float] | None = None,
        *,
        solo: Instance | None = None,
    ) -> None:
        if not instances:
            raise ValueError("a runtime pool needs at least one instance")
        self.instances = list(instances)  # the ones that run side by side
        self.solo = solo
        # Seconds per image at each timed batch size (first instance, best of two runs).
        self.per_image_seconds = per_image_seconds or {}
        # Images waiting behind the batch being placed; the service points it at its batcher.
        self.waiting: Callable[[], int] = lambda: 0
        self._free = deque(self.instances)
        self._running = 0
        self._solo_running = False
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    async def start(
        cls,
        factories: Sequence[tuple[str, BackendFactory]],
        *,
        inputs: InputSpec,
        max_batch_size: int,
        time_batches: bool = False,
        niceness: int = 0,
        solo: tuple[str, BackendFactory] | None = None,
    ) -> RuntimePool:
        """Create every instance (`solo` last) in its own thread and warm it at every batch size.

        With `time_batches`, the first instance is then timed at batch sizes 1, 2, 4, ... up
        to `max_batch_size`, so the service can tell whether batching pays on this device.
        """
        instances = []
        per_image: dict[int, float] = {}
        try:
            for index, (device, factory) in enumerate([*factories, *([solo] if solo else [])]):
                # The backend is built on its own thread, so threads it starts inherit the
                # lower priority (service.runtime.threads).
                thread = ThreadPoolExecutor(
                    1, f"hiera-infer-{index}", initializer=lower_priority, initargs=(niceness,)
                )
                try:
                    backend = await asyncio.wrap_future(thread.submit(factory))
                except BaseException:
                    thread.shutdown(wait=False)
                    raise
                feeder = await asyncio.wrap_future(
                    thread.submit(feeder_for, backend, device, inputs, max_batch_size)
                )
                instance = Instance(index, device, backend, feeder, thread)
                instances.append(instance)
                prepare = getattr(backend, "prepare", None)
                if prepare is not None:  # CUDA graphs, captured before the warm-up replays them
                    await asyncio.wrap_future(thread.submit(prepare, max_batch_size, inputs.shape))
                seconds = await asyncio.wrap_future(
                    thread.submit(_warm_up, instance, inputs.shape, max_batch_size)
                )
                log.info(
                    "instance %d (%s on %s via %s, %s) warmed at batch sizes 1..%d in %.2f s",
                    index,
                    backend.name,
                    device,
                    getattr(backend, "provider", backend.name),
                    backend.precision,
                    max_batch_size,
                    seconds,
                )
            if time_batches:
                first = instances[0]
                per_image = await asyncio.wrap_future(
                    first.thread.submit(_time_batches, first, inputs.shape, max_batch_size)
                )
                log.info(
                    "ms per image by batch size: %s",
                    {size: round(1e3 * t, 2) for size, t in per_image.items()},
                )
        except BaseException:
            _close_all(instances)
            raise
        if solo is not None:
            return cls(instances[:-1], per_image, solo=instances[-1])
        return cls(instances, per_image)

    def batch_cap(self, max_batch_size: int, tolerance: float = 0.05) -> int:
        """Return the smallest timed batch size within `tolerance` of the best time per image.

        Where batching pays (GPUs) that is the largest size; where it does not (small CPUs),
        a smaller one, so requests stop waiting on batch-mates that buy no throughput.
        """
        if not self.per_image_seconds:
            return max_batch_size
        best = min(self.per_image_seconds.values())
        return min(s for s, t in self.per_image_seconds.items() if t <= best * (1 + tolerance))

    @property
    def size(self) -> int:
        """Batches that can run at once (the solo instance never runs beside another)."""
        return len(self.instances)

    @property
    def all_instances(self) -> list[Instance]:
        """Every instance, the solo one last."""
        return [*self.instances, *([self.solo] if self.solo else [])]

    async def infer(self, items: Sequence[Any], logits: bool = True) -> Outputs:
        """Run the queued images `items` as one batch on the next free instance's thread;
        `logits`: whether some item needs the raw logits back (see Instance.run)."""
        instance = await self._take()
        try:
            instance.busy_since = time.monotonic()
            future = instance.thread.submit(instance.run, items, logits)
            result = await asyncio.wrap_future(future)
            instance.batches += 1
            return result
        finally:
            instance.busy_since = None
            self._give_back(instance)

    def _pick(self) -> Instance | None:
        if self.solo is not None and self._running == 0 and not self.waiting():
            return self.solo
        if self._free and not self._solo_running:
            return self._free.popleft()
        return None

    async def _take(self) -> Instance:
        while (instance := self._pick()) is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self._running += 1
        self._solo_running = instance is self.solo
        return instance

    def _give_back(self, instance: Instance) -> None:
        # Synchronous, so a cancelled caller still returns its instance.
        self._running -= 1
        if instance is self.solo:
            self._solo_running = False
        else:
            self._free.append(instance)
        for waiter in self._waiters:  # a handful at most: the batcher's concurrency
            if not waiter.done():
                waiter.set_result(None)

    # The timeout parameter is the documented API; asyncio.timeout() is used inside.
    async def close(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Release every instance once its batch finishes; False if one is still busy at timeout.

        A hung backend call cannot be interrupted: its thread is abandoned (the caller should
        then end the process without joining it) instead of holding shutdown hostage.
        """
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()

        def close_all() -> None:
            try:
                _close_all(self.all_instances)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone after a timeout
                    loop.call_soon_threadsafe(_resolve, closed)

        # A daemon thread of its own, not asyncio.to_thread: the event loop's default executor
        # is joined when the loop ends, which would wait out the hung call after all.
        threading.Thread(target=close_all, name="hiera-pool-close", daemon=True).start()
        done, _ = await asyncio.wait([closed], timeout=timeout)
        if not done:
            log.error("an instance still runs a batch after %s s; abandoning it", timeout)
            return False
        return True


def feeder_for(backend: Backend, device: str, inputs: InputSpec, max_batch_size: int) -> Feeder:
    """Build the feeder that prepares `backend`'s batches on `device` (in its stream, if any)."""
    return Feeder(
        device=device,
        input_dtype=getattr(backend, "input_dtype", "float32"),
        mean=inputs.mean,
        std=inputs.std,
        input_shape=inputs.shape,
        max_batch_size=max_batch_size,
        stream=getattr(backend, "stream", None),
    )


def _warm_up(instance: Instance, shape: tuple[int, int, int], max_batch_size: int) -> float:
    # Every batch size the batcher can send, through the same feeder as real batches:
    # allocators, ORT's per-shape plans, cuDNN autotuning and the TensorRT engine (one
    # profile covers 1..max) are then built here instead of inside a client's first request.
    started = time.perf_counter()
    crop = np.zeros(shape, np.uint8)
    for size in range(1, max_batch_size + 1):
        instance.run([crop] * size)
    return time.perf_counter() - started


def _time_batches(
    instance: Instance,
    shape: tuple[int, int, int],
    max_batch_size: int,
    *,
    rounds: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Return seconds per image at batch sizes 1, 2, 4, ... `max_batch_size`, each the best of
    `rounds` timings.

    The sizes take turns within each round rather than being timed one after another, at
    the same cost: a shared host changes speed for seconds at a time (the 2-core build
    machine's batch-1 time moves between about 60 and 90 ms), and timed in sequence, the
    sizes timed in a slow spell would look worse than those timed after it. Taking turns,
    each size has a timing in each part of the warm-up.
    """
    sizes = sorted({1, max_batch_size, *(2**k for k in range(1, 11) if 2**k < max_batch_size)})
    crop = np.zeros(shape, np.uint8)
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(rounds):
        for size in sizes:
            started = clock()
            instance.run([crop] * size)
            best[size] = min(best[size], clock() - started)
    return {size: seconds / size for size, seconds in best.items()}


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _close_all(instances: Sequence[Instance]) -> None:
    for instance in instances:
        instance.thread.shutdown(wait=True)
        try:
            instance.backend.close()
        except Exception:
            log.exception("closing instance %d failed", instance.index)
