"""Group single-image requests into batches and run them on a pool of model instances.

The batcher owns no model: it groups queued ``[3, H, W]`` items (float32 pixels, or uint8 crops
that the runtime normalises; numpy arrays or torch tensors) and awaits an ``infer`` callable
(the runtime pool) that returns ``(logits [B, C], embedding [B, D])``. By default a batch is
the items stacked into one ``[B, 3, H, W]`` numpy array; ``collate=list`` hands the runtime the
items themselves, so it can assemble them on its own device. A runtime that postprocesses on
its device returns the batch's ``BatchOutputs`` instead of the pair; with ``pass_logits_wanted``
it is called as ``infer(batch, logits)``, ``logits`` telling whether any item of the batch
asked for the raw logits (``submit(..., logits=...)``). Up to ``concurrency`` batches are
in flight at once, one per instance. A batch is dispatched at once when no batch is running
(every instance idle); the ``max_delay_ms`` window applies only while others are busy, unless
``wait_when_idle`` asks for it always.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ParamSpec, Protocol

import numpy as np

from service.postprocess import BatchOutputs

__all__ = [
    "BatchObserver",
    "BatchResult",
    "BatcherClosed",
    "BatcherError",
    "DeadlineExceeded",
    "DynamicBatcher",
    "InferFn",
    "InferenceFailed",
    "NullObserver",
    "QueueFull",
]

logger = logging.getLogger(__name__)

InferFn = Callable[..., Awaitable[tuple[np.ndarray, np.ndarray] | BatchOutputs]]
CollateFn = Callable[[list[Any]], Any]
_ITEM_DTYPES = frozenset({"float32", "uint8", "torch.float32", "torch.uint8"})
_P = ParamSpec("_P")
_NO_LOGITS = np.zeros(0, np.float32)  # read-only stand-in where no item asked for logits
_NO_LOGITS.flags.writeable = False


class BatcherError(Exception):
    """Fail one request; ``code`` is the machine-readable reason the API reports."""

    code: str = "batcher_error"


class QueueFull(BatcherError):
    """Reject a request because the service is at capacity; ``retry_after_s`` is a hint."""

    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(BatcherError):
    """Fail a request whose deadline passed before its result was ready."""

    code = "deadline_exceeded"


class BatcherClosed(BatcherError):
    """Reject a request because the batcher is shutting down."""

    code = "shutting_down"


class InferenceFailed(BatcherError):
    """Fail a request because the model call raised; the original error is ``__cause__``."""

    code = "inference_failed"


class BatchObserver(Protocol):
    """Receive batching metrics; implementations must be cheap and non-blocking."""

    def queue_depth(self, depth: int) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def batch_dispatched(self, size: int) -> None: ...
    def batch_done(self, size: int, seconds: float, ok: bool) -> None: ...
    def dropped(self, reason: str) -> None: ...


class NullObserver:
    """Ignore every metrics hook."""

    def queue_depth(self, depth: int) -> None:
        """Ignore the queue depth."""

    def queue_wait(self, seconds: float) -> None:
        """Ignore the queue wait."""

    def batch_dispatched(self, size: int) -> None:
        """Ignore the dispatch."""

    def batch_done(self, size: int, seconds: float, ok: bool) -> None:
        """Ignore the completion."""

    def dropped(self, reason: str) -> None:
        """Ignore the drop."""


# slots, not frozen: made once per input on the hot path, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs four times as much. Nothing writes to one after.
@dataclass(slots=True)
class BatchResult:
    """Hold one item's outputs and how it was served."""

    logits: np.ndarray
    embedding: np.ndarray
    batch_size: int
    queue_seconds: float
    infer_seconds: float
    # The whole batch's outputs, shared by its items (postprocessed once per batch), and the
    # row that is this item's.
    outputs: BatchOutputs | None = None
    row: int = 0


# eq=False: identity comparison, so deque.remove() never compares numpy arrays.
@dataclass(eq=False)
class _Pending:
    item: Any
    future: asyncio.Future[BatchResult]
    enqueued_at: float
    deadline: float | None
    logits: bool = True  # the caller needs the raw logits back
    dispatched: bool = False
    dropped: bool = False


class DynamicBatcher:
    """Batch concurrent ``submit`` calls and run each batch on the next free model instance."""

    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue_size: int,
        concurrency: int = 1,
        observer: BatchObserver | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_batch_error: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        collate: CollateFn = np.stack,
        wait_when_idle: bool = False,
        pass_logits_wanted: bool = False,
    ) -> None:
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_queue_size", max_queue_size),
            ("concurrency", concurrency),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (math.isfinite(max_delay_ms) and max_delay_ms >= 0):
            raise ValueError(f"max_delay_ms must be a finite number >= 0, got {max_delay_ms}")
        self._infer = infer
        self._pass_logits_wanted = pass_logits_wanted
        self._collate = collate
        self._max_batch_size = max_batch_size
        self._max_delay = max_delay_ms / 1000.0
        # By default the delay window only applies while another batch is running: with every
        # instance idle, waiting for company costs the first caller latency and buys nothing.
        self._wait_when_idle = wait_when_idle
        self._max_queue_size = max_queue_size
        self._observer: BatchObserver = observer if observer is not None else NullObserver()
        self._on_error = on_error
        # One failed batch fails its own requests; the caller decides when failures add up to
        # a broken runtime. Without this hook every failure goes to on_error.
        self._on_batch_error = on_batch_error
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        # A slot is taken before a batch is formed, so under load items keep accumulating
        # into bigger batches instead of queueing small ones behind busy instances.
        self._slots = asyncio.Semaphore(concurrency)
        self._batches: dict[asyncio.Task[None], list[_Pending]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        # The loop it runs on, held once started: asyncio.get_running_loop() costs a getpid()
        # system call per call on Python 3.11, and enqueue() runs once per input.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shape: tuple[int, ...] | None = None
        self._in_flight = 0
        self._running_batches = 0  # counted at dispatch, before the batch's task first runs
        # Smoothed duration of a batch: an item that cannot finish before its deadline is not
        # sent to the model, whose time then goes to requests that can still be answered.
        self._batch_seconds = 0.0
        # Smoothed model time per image, and how many batches run at once: what admission
        # needs to tell whether a backlog can still clear before a new request's deadline.
        self._image_seconds = 0.0
        self._concurrency = concurrency
        self._closing = False
        self._failed: BaseException | None = None

    def backlog_seconds(self, images: int) -> float | None:
        """Estimate the model time `images` images need at the recent pace (None: no batch yet)."""
        if self._image_seconds == 0:
            return None
        return images * self._image_seconds / self._concurrency

    @property
    def queue_depth(self) -> int:
        """Return how many requests wait for a batch."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Return how many requests are inside ``infer`` right now."""
        return self._in_flight

    @property
    def running(self) -> bool:
        """Return whether the dispatch task is alive and new requests are accepted."""
        task = self._loop_task
        return task is not None and not task.done() and not self._closing

    async def start(self) -> None:
        """Start the background dispatch task; calling it again is a no-op."""
        if self._closing:
            raise BatcherClosed("batcher is closed; create a new DynamicBatcher to serve again")
        self._spawn_loop()

    async def submit(
        self, item: Any, *, deadline: float | None = None, logits: bool = True
    ) -> BatchResult:
        """Queue one ``[3, H, W]`` item and wait for its row of the batch outputs.

        ``logits=False`` says the caller reads no raw logits (a runtime may then not send them
        back; the result's ``logits`` is then empty).
        """
        # Awaiting the future directly: a cancelled caller cancels it, which withdraws the item.
        return await self.enqueue(item, deadline=deadline, logits=logits)

    def enqueue(
        self, item: Any, *, deadline: float | None = None, logits: bool = True
    ) -> asyncio.Future[BatchResult]:
        """Queue one ``[3, H, W]`` item; return the future its result (or error) resolves.

        The entry for callers that must not cost a task per item (the engine process answers
        each corridor input from a callback): cancelling the future withdraws the item unless
        it already reached the model, and past ``deadline`` it fails with DeadlineExceeded.
        Refusals (full, closed, a passed deadline, a bad item) raise here, at once.
        """
        self._validate(item)
        if self._failed is not None:
            raise InferenceFailed("batch dispatcher crashed; restart the service") from self._failed
        if self._closing:
            raise BatcherClosed("batcher is shutting down; retry against another replica")
        if len(self._queue) >= self._max_queue_size:
            raise QueueFull(
                f"{len(self._queue)} requests already queued (max_queue_size="
                f"{self._max_queue_size}); retry later or add capacity"
            )
        now = self._clock()
        if deadline is not None and deadline <= now:
            self._observe(self._observer.dropped, "deadline")
            raise DeadlineExceeded("deadline passed before the request was queued")
        loop = self._loop or asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), now, deadline, logits=logits)
        self._queue.append(pending)
        self._observe(self._observer.queue_depth, len(self._queue))
        self._wakeup.set()
        if deadline is not None:
            # One timer per item, not a task: cheap enough for thousands per second.
            timer = loop.call_later(deadline - now, self._expire, pending)
            pending.future.add_done_callback(lambda _: timer.cancel())
        pending.future.add_done_callback(partial(self._settled, pending))
        return pending.future

    def _expire(self, pending: _Pending) -> None:
        """Fail an item whose deadline passed while it waited for the model."""
        if pending.future.done():
            return
        pending.future.set_exception(
            DeadlineExceeded("deadline passed while waiting for the model")
        )
        self._abandon(pending, "deadline")

    def _settled(self, pending: _Pending, future: asyncio.Future[BatchResult]) -> None:
        if future.cancelled():  # its caller left
            self._abandon(pending, "cancelled")

    # The timeout parameter is the documented API; asyncio.timeout() is used inside.
    async def close(self, *, drain: bool = True, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Stop accepting requests, finish (drain) or reject queued ones, and await in-flight."""
        self._closing = True
        self._wakeup.set()
        if not drain:
            self._fail_queued(lambda: BatcherClosed("batcher closed before this request ran"))
        elif self._queue:
            # Items submitted before start() still deserve an answer when draining.
            self._spawn_loop()
        try:
            async with asyncio.timeout(timeout):
                # asyncio.wait(), not await: on timeout the tasks must stay alive until their
                # callers have been failed with BatcherClosed below.
                if self._loop_task is not None:
                    await asyncio.wait([self._loop_task])
                while self._batches:
                    await asyncio.wait(list(self._batches))
        except TimeoutError:
            self._fail_queued(lambda: BatcherClosed("batcher closed before this request ran"))
            for task, batch in list(self._batches.items()):
                for p in batch:
                    _fail(p, BatcherClosed("batcher closed while this request was running"))
                # Not awaited: an infer that ignores cancellation must not stretch the timeout.
                task.cancel()
            if self._loop_task is not None:
                self._loop_task.cancel()

    def _spawn_loop(self) -> None:
        if self._loop_task is None:
            self._loop = asyncio.get_running_loop()
            self._loop_task = self._loop.create_task(self._dispatch_loop(), name="dynamic-batcher")

    def _validate(self, item: Any) -> None:
        shape, dtype = getattr(item, "shape", None), str(getattr(item, "dtype", ""))
        if shape is None or dtype not in _ITEM_DTYPES or len(shape) != 3:
            got = type(item).__name__ if shape is None else f"{dtype} array of shape {shape}"
            raise ValueError(f"item must be a float32 or uint8 array of shape [3, H, W], got {got}")
        shape = tuple(shape)
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(
                f"item shape {shape} differs from the model input shape {self._shape} set "
                f"by the first request; resize to {self._shape[1]}x{self._shape[2]} first"
            )

    async def _dispatch_loop(self) -> None:
        """Form a batch whenever an instance is free, until closed and drained."""
        try:
            while True:
                await self._slots.acquire()
                try:
                    batch = await self._next_batch()
                except BaseException:
                    self._slots.release()
                    raise
                if batch is None:
                    self._slots.release()
                    return
                self._running_batches += 1
                task = asyncio.create_task(self._run_batch(batch, self._clock()))
                self._batches[task] = batch  # strong reference until the batch finishes
                task.add_done_callback(self._batch_finished)
        except Exception as exc:
            self._failed = cause = exc
            self._report_error(exc)
            self._fail_queued(lambda: _chained(InferenceFailed("batch dispatcher crashed"), cause))

    async def _next_batch(self) -> list[_Pending] | None:
        """Wait until a batch is due and pop it; return None once closing with nothing queued."""
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._closing:
                    return None
                await self._wakeup.wait()
                continue
            idle = self._running_batches == 0 and not self._wait_when_idle
            if len(self._queue) < self._max_batch_size and not self._closing and not idle:
                # Measured from the first item's enqueue time, so time spent waiting for a
                # free instance counts toward the delay bound.
                due_in = self._queue[0].enqueued_at + self._max_delay - self._clock()
                if due_in > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due_in):
                            await self._wakeup.wait()
                    continue
            batch = self._pop_batch()
            if batch:
                return batch

    def _pop_batch(self) -> list[_Pending]:
        now = self._clock()
        # Predicted misses are dropped only under overload (more queued than one batch takes):
        # then the model's time is better spent on others, and an estimate inflated by one slow
        # batch cannot starve a lightly loaded service, since light load always gets its turn.
        finish = now + self._batch_seconds if len(self._queue) > self._max_batch_size else now
        batch: list[_Pending] = []
        while self._queue and len(batch) < self._max_batch_size:
            p = self._queue.popleft()
            if p.future.done():
                continue  # the caller left; submit() already reported the drop
            if p.deadline is not None and (p.deadline <= now or p.deadline < finish):
                p.dropped = True
                p.future.set_exception(
                    DeadlineExceeded(
                        "deadline passed while queued"
                        if p.deadline <= now
                        else f"deadline would pass before the model finishes (a batch takes "
                        f"about {1e3 * self._batch_seconds:.0f} ms)"
                    )
                )
                self._observe(self._observer.dropped, "deadline")
                continue
            p.dispatched = True
            batch.append(p)
        self._observe(self._observer.queue_depth, len(self._queue))
        return batch

    async def _run_batch(self, batch: list[_Pending], dispatched_at: float) -> None:
        """Run one batch through ``infer`` and hand row i of the outputs to item i."""
        size = len(batch)
        self._in_flight += size
        try:
            for p in batch:
                self._observe(self._observer.queue_wait, dispatched_at - p.enqueued_at)
            self._observe(self._observer.batch_dispatched, size)
            started = self._clock()
            try:
                inputs = self._collate([p.item for p in batch])
                if self._pass_logits_wanted:
                    produced = await self._infer(inputs, any(p.logits for p in batch))
                else:
                    produced = await self._infer(inputs)
                outputs = (
                    produced if isinstance(produced, BatchOutputs) else BatchOutputs(*produced)
                )
                _check_outputs(outputs, size)
            except Exception as exc:
                elapsed = self._clock() - started
                self._report_batch_error(exc)
                for p in batch:
                    _fail(p, _chained(InferenceFailed(f"inference failed: {exc!r}"), exc))
                self._observe(self._observer.batch_done, size, elapsed, False)
                return
            elapsed = self._clock() - started
            # Exponential average: follows load changes within a few batches.
            self._batch_seconds = (
                elapsed if self._batch_seconds == 0 else 0.8 * self._batch_seconds + 0.2 * elapsed
            )
            per_image = elapsed / size
            self._image_seconds = (
                per_image
                if self._image_seconds == 0
                else 0.8 * self._image_seconds + 0.2 * per_image
            )
            logits, embedding = outputs.logits, outputs.embedding
            for i, p in enumerate(batch):
                if not p.future.done():  # a caller that left (cancel, deadline) gets nothing
                    p.future.set_result(
                        BatchResult(
                            logits=_NO_LOGITS if logits is None else logits[i],
                            embedding=embedding[i],
                            batch_size=size,
                            queue_seconds=dispatched_at - p.enqueued_at,
                            infer_seconds=elapsed,
                            outputs=outputs,
                            row=i,
                        )
                    )
            self._observe(self._observer.batch_done, size, elapsed, True)
        finally:
            self._in_flight -= size
            self._running_batches -= 1
            self._slots.release()
            # No-op unless infer was cancelled or raised a BaseException: never strand a caller.
            for p in batch:
                _fail(
                    p,
                    BatcherClosed("batcher closed while this request was running")
                    if self._closing
                    else InferenceFailed("inference was interrupted"),
                )

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._report_error(exc)

    def _abandon(self, pending: _Pending, reason: str) -> None:
        """Forget an item whose caller stopped waiting, unless it already reached the model."""
        fut = pending.future
        if fut.done() and not fut.cancelled():
            fut.exception()  # mark retrieved so asyncio does not warn about a lost error
        if pending.dispatched or pending.dropped:
            return
        pending.dropped = True
        with contextlib.suppress(ValueError):
            self._queue.remove(pending)
        self._observe(self._observer.dropped, reason)
        self._observe(self._observer.queue_depth, len(self._queue))

    def _fail_queued(self, make_error: Callable[[], BatcherError]) -> None:
        queued = list(self._queue)
        self._queue.clear()
        for p in queued:
            if not p.future.done():
                error = make_error()
                p.future.set_exception(error)
                if isinstance(error, BatcherClosed):
                    self._observe(self._observer.dropped, "closed")
        if queued:
            self._observe(self._observer.queue_depth, 0)

    def _report_batch_error(self, exc: BaseException) -> None:
        if self._on_batch_error is None:
            self._report_error(exc)
            return
        try:
            self._on_batch_error(exc)
        except Exception:
            logger.exception("on_batch_error callback raised")

    def _report_error(self, exc: BaseException) -> None:
        if self._on_error is None:
            logger.error("batch inference failed", exc_info=exc)
            return
        try:
            self._on_error(exc)
        except Exception:
            logger.exception("on_error callback raised")

    def _observe(self, hook: Callable[_P, None], *args: _P.args, **kwargs: _P.kwargs) -> None:
        # A broken metrics hook must never fail requests or kill the dispatch loop.
        try:
            hook(*args, **kwargs)
        except Exception:
            logger.exception("batch observer hook %s raised", getattr(hook, "__name__", hook))


def _fail(pending: _Pending, error: BatcherError) -> None:
    if not pending.future.done():
        pending.future.set_exception(error)


def _chained(error: BatcherError, cause: BaseException) -> BatcherError:
    error.__cause__ = cause
    return error


def _check_outputs(outputs: BatchOutputs, size: int) -> None:
    named = [("logits", outputs.logits), ("embedding", outputs.embedding)]
    if outputs.ranked is not None:
        named += [("ranked indices", outputs.ranked[0]), ("ranked scores", outputs.ranked[1])]
    for name, out in named:
        if out is None:
            continue  # logits a device-postprocessed batch did not bring back
        if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != size:
            shape = getattr(out, "shape", type(out).__name__)
            raise ValueError(
                f"infer returned {name} with shape {shape} for a batch of {size}; "
                f"the runtime must return one row per input, shaped [{size}, N]"
            )
