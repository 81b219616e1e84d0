"""Tests for the asyncio dynamic batcher (no model, no HTTP: a fake async infer)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.batching import (
    BatcherClosed,
    BatcherError,
    BatchResult,
    DeadlineExceeded,
    DynamicBatcher,
    InferenceFailed,
    NullObserver,
    QueueFull,
)
from service.postprocess import BatchOutputs

pytestmark = pytest.mark.timeout(20)

SHAPE = (3, 4, 4)
K = 5  # logits columns
D = 3  # embedding columns


def make_item(seed: int) -> np.ndarray:
    """Return a distinct float32 [3, H, W] item per seed."""
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def expected(item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return what FakeModel computes for one item."""
    return item.reshape(-1)[:K], item.mean() + np.arange(D, dtype=np.float32)


class Waitable:
    """Let tests await a predicate over state that sync callbacks mutate."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], asyncio.Event]] = []

    def changed(self) -> None:
        for pred, event in self._waiters:
            if pred():
                event.set()

    async def until(self, pred: Callable[[], bool], within: float = 5.0) -> None:
        event = asyncio.Event()
        self._waiters.append((pred, event))
        self.changed()
        async with asyncio.timeout(within):
            await event.wait()


class FakeModel(Waitable):
    """Compute item-specific rows; optionally block on a gate, sleep, or raise."""

    def __init__(self, *, delay: float = 0.0, gated: bool = False) -> None:
        super().__init__()
        self.delay = delay
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.batches: list[np.ndarray] = []
        self.entered_at: list[float] = []
        self.active = 0
        self.max_active = 0
        self.fail_with: BaseException | None = None

    async def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert batch.dtype == np.float32 and batch.flags.c_contiguous
        self.batches.append(batch.copy())
        self.entered_at.append(time.monotonic())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.changed()
        try:
            await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)  # simulated compute time, not synchronization
            if self.fail_with is not None:
                exc, self.fail_with = self.fail_with, None
                raise exc
            b = batch.shape[0]
            logits = batch.reshape(b, -1)[:, :K].copy()
            embedding = batch.mean(axis=(1, 2, 3))[:, None] + np.arange(D, dtype=np.float32)
            return logits, embedding
        finally:
            self.active -= 1
            self.changed()

    def saw(self, item: np.ndarray) -> bool:
        return any((b == item).all(axis=(1, 2, 3)).any() for b in self.batches)


class RecordingObserver(Waitable):
    """Record every metrics hook call."""

    def __init__(self) -> None:
        super().__init__()
        self.depths: list[int] = []
        self.waits: list[float] = []
        self.dispatched: list[int] = []
        self.done: list[tuple[int, float, bool]] = []
        self.drops: list[str] = []

    @property
    def depth(self) -> int:
        return self.depths[-1] if self.depths else 0

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)
        self.changed()

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def batch_dispatched(self, size: int) -> None:
        self.dispatched.append(size)
        self.changed()

    def batch_done(self, size: int, seconds: float, ok: bool) -> None:
        self.done.append((size, seconds, ok))
        self.changed()

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)
        self.changed()


class FakeClock:
    """Return a time that only moves when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    model: FakeModel, obs: RecordingObserver | None = None, **kwargs: Any
) -> tuple[DynamicBatcher, list[BaseException]]:
    errors: list[BaseException] = []
    # These tests exercise the window itself, so it applies even with every instance idle;
    # the default (dispatch at once when idle) has its own tests below.
    opts: dict[str, Any] = {
        "max_batch_size": 8,
        "max_delay_ms": 5,
        "max_queue_size": 100,
        "wait_when_idle": True,
    }
    opts.update(kwargs)
    batcher = DynamicBatcher(model, observer=obs, on_error=errors.append, **opts)
    return batcher, errors


def submit_all(
    batcher: DynamicBatcher, items: list[np.ndarray], **kwargs: Any
) -> list[asyncio.Task[BatchResult]]:
    return [asyncio.create_task(batcher.submit(x, **kwargs)) for x in items]


# -- 1. every request resolves exactly once -------------------------------------------------


async def test_every_request_resolves_exactly_once_under_chaos() -> None:
    model = FakeModel(delay=0.002)
    batcher, errors = make(model, max_batch_size=8, concurrency=2, max_queue_size=1000)
    await batcher.start()
    rng = random.Random(7)
    injected: list[BaseException] = []

    async def failer() -> None:
        for _ in range(5):
            await asyncio.sleep(0.01)
            exc = RuntimeError("injected")
            injected.append(exc)
            model.fail_with = exc

    items = [make_item(i) for i in range(300)]
    tasks = []
    for i, x in enumerate(items):
        deadline = time.monotonic() + rng.uniform(0.0, 0.05) if i % 5 == 0 else None
        tasks.append(asyncio.create_task(batcher.submit(x, deadline=deadline)))
    fail_task = asyncio.create_task(failer())
    for t in rng.sample(tasks, 60):
        asyncio.get_running_loop().call_later(rng.uniform(0, 0.03), t.cancel)
    await fail_task
    await batcher.close(drain=True, timeout=10)

    _, pending = await asyncio.wait(tasks, timeout=5)
    assert not pending
    outcomes: dict[str, int] = {}
    for x, t in zip(items, tasks, strict=True):
        if t.cancelled():
            kind = "cancelled"
        elif (exc := t.exception()) is not None:
            assert isinstance(exc, DeadlineExceeded | InferenceFailed), exc
            kind = type(exc).__name__
        else:
            logits, embedding = expected(x)
            np.testing.assert_allclose(t.result().logits, logits)
            np.testing.assert_allclose(t.result().embedding, embedding, rtol=1e-5)
            kind = "ok"
        outcomes[kind] = outcomes.get(kind, 0) + 1
    assert outcomes.get("ok", 0) > 100
    assert outcomes.get("InferenceFailed", 0) > 0  # the chaos really failed some batches
    # Only the injected failures reached on_error: no InvalidStateError from a double resolve.
    assert errors and all(e in injected for e in errors)
    assert batcher.in_flight == 0 and batcher.queue_depth == 0


async def test_dispatch_loop_crash_fails_pending_and_later_submits_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = FakeModel()
    obs = RecordingObserver()
    batcher, errors = make(model, obs)
    tasks = submit_all(batcher, [make_item(i) for i in range(3)])
    await obs.until(lambda: obs.depth == 3)
    bug = RuntimeError("bug in batch formation")

    async def broken_next_batch() -> None:
        raise bug

    monkeypatch.setattr(batcher, "_next_batch", broken_next_batch)
    await batcher.start()
    for t in tasks:
        with pytest.raises(InferenceFailed) as info:
            await t
        assert info.value.__cause__ is bug
    assert errors == [bug]
    assert not batcher.running
    with pytest.raises(InferenceFailed):
        async with asyncio.timeout(1):
            await batcher.submit(make_item(9))
    await batcher.close(timeout=1)
    assert model.batches == []


# -- 2/3. results go to their own caller; batches form under concurrency --------------------


async def test_each_caller_gets_its_own_row() -> None:
    model = FakeModel(delay=0.01)
    obs = RecordingObserver()
    batcher, errors = make(model, obs, max_batch_size=8, concurrency=2)
    await batcher.start()
    items = [make_item(i) for i in range(64)]
    results = await asyncio.gather(*submit_all(batcher, items))
    for x, r in zip(items, results, strict=True):
        logits, embedding = expected(x)
        np.testing.assert_array_equal(r.logits, logits)
        np.testing.assert_allclose(r.embedding, embedding, rtol=1e-5)
        assert r.logits.shape == (K,) and r.embedding.shape == (D,)
        # The batch-wide outputs are shared by the batch, and `row` points at this item's.
        assert r.outputs is not None
        np.testing.assert_array_equal(r.outputs.logits[r.row], logits)
    assert max(r.batch_size for r in results) > 1
    shared = [r for r in results if r.outputs is results[0].outputs]
    assert sorted(r.row for r in shared) == list(range(results[0].batch_size))
    assert errors == []
    await batcher.close()


async def test_concurrent_submits_form_batches_larger_than_one() -> None:
    model = FakeModel(delay=0.02)
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_batch_size=4, max_delay_ms=20)
    await batcher.start()
    results = await asyncio.gather(*submit_all(batcher, [make_item(i) for i in range(12)]))
    assert all(r.batch_size > 1 for r in results)
    assert max(obs.dispatched) == 4 and sum(obs.dispatched) == 12
    assert [s for s, _, ok in obs.done if ok] == obs.dispatched
    assert len(obs.waits) == 12 and all(w >= 0 for w in obs.waits)
    assert all(r.infer_seconds >= 0.015 for r in results)
    await batcher.close()


# -- 4. the delay bound ---------------------------------------------------------------------


async def test_single_request_is_dispatched_after_max_delay() -> None:
    model = FakeModel()
    batcher, _ = make(model, max_delay_ms=80)
    await batcher.start()
    t0 = time.monotonic()
    result = await batcher.submit(make_item(0))
    waited = model.entered_at[0] - t0
    assert 0.075 <= waited <= 0.08 + 0.15
    assert result.batch_size == 1 and result.queue_seconds >= 0.075
    await batcher.close()


async def test_full_batch_is_dispatched_without_waiting_for_the_delay() -> None:
    model = FakeModel()
    # A 10 s delay would blow the 2 s timeout if a full batch waited for it.
    batcher, _ = make(model, max_batch_size=4, max_delay_ms=10_000)
    await batcher.start()
    async with asyncio.timeout(2):
        results = await asyncio.gather(*submit_all(batcher, [make_item(i) for i in range(4)]))
    assert [r.batch_size for r in results] == [4, 4, 4, 4]
    await batcher.close(drain=False)


async def test_delay_counts_from_first_enqueue_not_from_pickup() -> None:
    clock = FakeClock()
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_batch_size=4, max_delay_ms=10_000, clock=clock)
    await batcher.start()
    first = submit_all(batcher, [make_item(i) for i in range(4)])  # full: goes immediately
    await model.until(lambda: model.active == 1)
    late = submit_all(batcher, [make_item(10), make_item(11)])
    await obs.until(lambda: obs.depth == 2)
    clock.now += 11.0  # the queued items have now waited longer than max_delay
    model.gate.set()
    # Without the rule they would sit out another 10 s (frozen clock: forever).
    async with asyncio.timeout(2):
        results = await asyncio.gather(*first, *late)
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 2, 2]
    assert results[-1].queue_seconds == pytest.approx(11.0)
    await batcher.close()


async def test_idle_instance_takes_a_lone_request_at_once() -> None:
    clock = FakeClock()  # frozen: only dispatching without the window can finish in time
    model = FakeModel()
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_delay_ms=10_000, clock=clock, wait_when_idle=False)
    await batcher.start()
    async with asyncio.timeout(2):
        result = await batcher.submit(make_item(0))
    assert result.batch_size == 1 and result.queue_seconds == 0.0
    assert obs.dispatched == [1]
    await batcher.close()


async def test_window_applies_while_another_batch_runs() -> None:
    clock = FakeClock()
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, _ = make(
        model, obs, max_batch_size=4, max_delay_ms=10_000, clock=clock, concurrency=2,
        wait_when_idle=False,
    )  # fmt: skip
    await batcher.start()
    first = submit_all(batcher, [make_item(0)])  # both instances idle: goes at once
    await model.until(lambda: model.active == 1)
    late = submit_all(batcher, [make_item(1), make_item(2)])
    await obs.until(lambda: obs.depth == 2)
    # One instance is free but another batch runs: the two wait for company, not dispatch.
    assert model.active == 1 and batcher.queue_depth == 2
    late.extend(submit_all(batcher, [make_item(3), make_item(4)]))  # fills a batch of 4
    await model.until(lambda: model.active == 2)
    model.gate.set()
    results = await asyncio.gather(*first, *late)
    assert [r.batch_size for r in results] == [1, 4, 4, 4, 4]
    await batcher.close()


async def test_busy_single_instance_batches_what_queued_meanwhile() -> None:
    clock = FakeClock()
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_delay_ms=10_000, clock=clock, wait_when_idle=False)
    await batcher.start()
    first = submit_all(batcher, [make_item(0)])
    await model.until(lambda: model.active == 1)
    late = submit_all(batcher, [make_item(i) for i in range(1, 4)])
    await obs.until(lambda: obs.depth == 3)
    model.gate.set()
    # The instance is idle again once the first batch ends: the three go together at once
    # (the frozen clock would hold them forever if the window applied).
    async with asyncio.timeout(2):
        results = await asyncio.gather(*first, *late)
    assert [r.batch_size for r in results] == [1, 3, 3, 3]
    await batcher.close()


# -- 5. batches go to the next free instance; new batches form only when one is free --------


async def test_two_instances_run_two_batches_at_once() -> None:
    model = FakeModel(gated=True)
    batcher, _ = make(model, max_batch_size=2, max_delay_ms=10_000, concurrency=2)
    await batcher.start()
    tasks = submit_all(batcher, [make_item(i) for i in range(6)])
    await model.until(lambda: model.active == 2)
    # Both instances are busy: the third batch waits in the queue, not in a backlog of tasks.
    assert batcher.in_flight == 4 and batcher.queue_depth == 2
    model.gate.set()
    results = await asyncio.gather(*tasks)
    assert model.max_active == 2
    assert [r.batch_size for r in results] == [2] * 6
    await batcher.close()


async def test_batches_grow_while_the_only_instance_is_busy() -> None:
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_batch_size=8, max_delay_ms=1, concurrency=1)
    await batcher.start()
    first = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    rest = submit_all(batcher, [make_item(i) for i in range(1, 6)])
    await obs.until(lambda: obs.depth == 5)
    model.gate.set()
    await asyncio.gather(first, *rest)
    assert obs.dispatched == [1, 5]
    await batcher.close()


# -- 6. cancelled requests never reach the model --------------------------------------------


async def test_cancelled_request_is_dropped_before_the_model() -> None:
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, errors = make(model, obs, concurrency=1)
    await batcher.start()
    busy = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    gone_item, kept_item = make_item(1), make_item(2)
    gone = asyncio.create_task(batcher.submit(gone_item))
    kept = asyncio.create_task(batcher.submit(kept_item))
    await obs.until(lambda: obs.depth == 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert obs.drops == ["cancelled"] and batcher.queue_depth == 1
    model.gate.set()
    await asyncio.gather(busy, kept)
    assert not model.saw(gone_item) and model.saw(kept_item)
    assert errors == []
    await batcher.close()


async def test_cancel_while_inside_infer_discards_the_result_quietly() -> None:
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, errors = make(model, obs, max_batch_size=2, max_delay_ms=10_000)
    await batcher.start()
    gone, kept = submit_all(batcher, [make_item(0), make_item(1)])
    await model.until(lambda: model.active == 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    model.gate.set()
    result = await kept
    assert result.batch_size == 2
    assert obs.drops == []  # it reached the model, so it was not dropped
    assert errors == []
    await batcher.close()


# -- 7. deadlines ---------------------------------------------------------------------------


async def test_expired_item_is_resolved_at_batch_formation_and_never_inferred() -> None:
    clock = FakeClock()
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_batch_size=4, max_delay_ms=0, clock=clock)
    await batcher.start()
    busy = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    late_item, ok_item = make_item(1), make_item(2)
    late = asyncio.create_task(batcher.submit(late_item, deadline=clock.now + 5))
    ok = asyncio.create_task(batcher.submit(ok_item, deadline=clock.now + 60))
    await obs.until(lambda: obs.depth == 2)
    clock.now += 10
    model.gate.set()
    with pytest.raises(DeadlineExceeded):
        async with asyncio.timeout(2):  # the 5 s real-time timer in submit must not be needed
            await late
    assert (await ok).batch_size == 1
    await busy
    assert obs.drops == ["deadline"]
    assert not model.saw(late_item)
    await batcher.close()


async def test_item_that_cannot_finish_in_time_is_not_sent_to_the_model() -> None:
    clock = FakeClock()
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    # Batches of 1, so two queued items are more than one batch: the service is overloaded.
    batcher, _ = make(model, obs, max_batch_size=1, max_delay_ms=0, clock=clock)
    await batcher.start()
    busy = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    hopeless, fine = make_item(1), make_item(2)
    # Queued while the first batch runs; that batch will have taken 1 s (fake clock).
    short = asyncio.create_task(batcher.submit(hopeless, deadline=clock.now + 1.5))
    long = asyncio.create_task(batcher.submit(fine, deadline=clock.now + 5.0))
    await obs.until(lambda: obs.depth == 2)
    clock.now += 1.0
    model.gate.set()
    await busy
    # 0.5 s left is less than a batch takes: dropped now, not computed and thrown away.
    with pytest.raises(DeadlineExceeded, match="would pass before the model finishes"):
        async with asyncio.timeout(2):
            await short
    assert (await long).batch_size == 1
    assert obs.drops == ["deadline"] and not model.saw(hopeless) and model.saw(fine)
    await batcher.close()


async def test_light_load_is_tried_even_when_a_batch_was_slow() -> None:
    clock = FakeClock()
    model = FakeModel(gated=True)
    batcher, _ = make(model, max_batch_size=4, max_delay_ms=0, clock=clock)
    await batcher.start()
    slow = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    clock.now += 10.0  # one pathological 10 s batch
    model.gate.set()
    await slow
    # Alone in the queue, it gets its chance although the estimate says it would miss.
    async with asyncio.timeout(2):
        result = await batcher.submit(make_item(1), deadline=clock.now + 1.0)
    assert result.batch_size == 1
    await batcher.close()


async def test_submit_stops_waiting_at_the_deadline_even_inside_infer() -> None:
    clock = FakeClock()  # frozen, so the item is never expired at batch formation
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, errors = make(model, obs, max_delay_ms=0, clock=clock)
    await batcher.start()
    t0 = time.monotonic()
    task = asyncio.create_task(batcher.submit(make_item(0), deadline=clock.now + 0.2))
    await model.until(lambda: model.active == 1)
    with pytest.raises(DeadlineExceeded):
        await task
    assert time.monotonic() - t0 < 0.2 + 1.0
    model.gate.set()
    await obs.until(lambda: len(obs.done) == 1)
    assert obs.done[0][2] is True and errors == []
    await batcher.close()
    assert batcher.in_flight == 0


async def test_deadline_already_passed_is_rejected_at_submit() -> None:
    model = FakeModel()
    obs = RecordingObserver()
    batcher, _ = make(model, obs)
    await batcher.start()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(make_item(0), deadline=time.monotonic() - 1)
    assert obs.drops == ["deadline"] and model.batches == []
    await batcher.close()


# -- 8. bounded queue -----------------------------------------------------------------------


async def test_queue_full_is_raised_immediately() -> None:
    model = FakeModel()
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_queue_size=2)  # not started: nothing drains the queue
    waiting = submit_all(batcher, [make_item(0), make_item(1)])
    await obs.until(lambda: obs.depth == 2)
    with pytest.raises(QueueFull) as info:
        async with asyncio.timeout(1):
            await batcher.submit(make_item(2))
    assert info.value.code == "queue_full"
    waiting[0].cancel()
    await obs.until(lambda: obs.depth == 1)  # a cancelled item frees its slot
    waiting.append(asyncio.create_task(batcher.submit(make_item(3))))
    await obs.until(lambda: obs.depth == 2)
    await batcher.close(drain=False)
    for t in waiting[1:]:
        with pytest.raises(BatcherClosed):
            await t


# -- 9. input validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (np.zeros(SHAPE, dtype=np.float64), "float32"),
        (np.zeros((1, *SHAPE), dtype=np.float32), "uint8 array of shape"),
        ([[0.0]], "got list"),
        (np.zeros((3, 8, 8), dtype=np.float32), r"differs from the model input shape"),
    ],
)
async def test_submit_rejects_bad_items(item: Any, match: str) -> None:
    model = FakeModel()
    batcher, _ = make(model, max_delay_ms=0)
    await batcher.start()
    await batcher.submit(make_item(0))  # fixes the input shape to SHAPE
    with pytest.raises(ValueError, match=match):
        await batcher.submit(item)
    assert len(model.batches) == 1
    await batcher.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
        ({"max_queue_size": 0}, "max_queue_size must be >= 1, got 0"),
        ({"concurrency": 0}, "concurrency must be >= 1, got 0"),
        ({"max_delay_ms": -1}, "max_delay_ms must be a finite number >= 0, got -1"),
        ({"max_delay_ms": float("inf")}, "max_delay_ms must be a finite number"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    opts: dict[str, Any] = {"max_batch_size": 4, "max_delay_ms": 5, "max_queue_size": 10}
    opts.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DynamicBatcher(FakeModel(), **opts)


# -- 10. close ------------------------------------------------------------------------------


async def test_close_drain_finishes_queued_and_in_flight_then_rejects() -> None:
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_delay_ms=0, concurrency=1)
    await batcher.start()
    assert batcher.running
    running = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    queued = submit_all(batcher, [make_item(1), make_item(2)])
    await obs.until(lambda: obs.depth == 2)
    closing = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0)  # one loop turn: close() flips to closing before its first await
    assert not batcher.running
    with pytest.raises(BatcherClosed) as info:
        await batcher.submit(make_item(3))
    assert info.value.code == "shutting_down"
    assert not closing.done()
    model.gate.set()
    results = await asyncio.gather(running, *queued)
    assert [r.batch_size for r in results] == [1, 2, 2]
    async with asyncio.timeout(2):
        await closing
    assert obs.drops == []


async def test_close_without_drain_rejects_queued_and_waits_for_in_flight() -> None:
    model = FakeModel(gated=True)
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_delay_ms=0, concurrency=1)
    await batcher.start()
    running = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    queued_items = [make_item(1), make_item(2)]
    queued = submit_all(batcher, queued_items)
    await obs.until(lambda: obs.depth == 2)
    closing = asyncio.create_task(batcher.close(drain=False))
    for t in queued:
        with pytest.raises(BatcherClosed):
            await t
    assert obs.drops == ["closed", "closed"]
    assert not closing.done()
    model.gate.set()
    assert (await running).batch_size == 1
    async with asyncio.timeout(2):
        await closing
    assert not any(model.saw(x) for x in queued_items)


async def test_close_timeout_fails_everything_left() -> None:
    model = FakeModel(gated=True)  # the gate never opens: infer hangs
    obs = RecordingObserver()
    batcher, _ = make(model, obs, max_delay_ms=0, concurrency=1)
    await batcher.start()
    running = asyncio.create_task(batcher.submit(make_item(0)))
    await model.until(lambda: model.active == 1)
    queued = asyncio.create_task(batcher.submit(make_item(1)))
    await obs.until(lambda: obs.depth == 1)
    t0 = time.monotonic()
    await batcher.close(drain=True, timeout=0.2)
    assert time.monotonic() - t0 < 0.2 + 1.0
    for t in (running, queued):
        with pytest.raises(BatcherClosed):
            await t
    await model.until(lambda: model.active == 0)  # the hung infer task was cancelled


async def test_close_drains_items_submitted_before_start() -> None:
    model = FakeModel()
    obs = RecordingObserver()
    batcher, _ = make(model, obs)
    task = asyncio.create_task(batcher.submit(make_item(0)))
    await obs.until(lambda: obs.depth == 1)
    await batcher.close()
    assert (await task).batch_size == 1
    with pytest.raises(BatcherClosed):
        await batcher.start()


async def test_start_is_idempotent() -> None:
    batcher, _ = make(FakeModel())
    assert not batcher.running
    await batcher.start()
    await batcher.start()
    assert batcher.running
    await batcher.close()
    assert not batcher.running


# -- 11. infer raising ----------------------------------------------------------------------


async def test_infer_error_fails_the_batch_and_later_batches_still_run() -> None:
    model = FakeModel()
    obs = RecordingObserver()
    batcher, errors = make(model, obs, max_batch_size=3, max_delay_ms=10_000)
    await batcher.start()
    boom = RuntimeError("CUDA out of memory")
    model.fail_with = boom
    failed = await asyncio.gather(
        *submit_all(batcher, [make_item(i) for i in range(3)]), return_exceptions=True
    )
    for exc in failed:
        assert isinstance(exc, InferenceFailed) and exc.__cause__ is boom
        assert exc.code == "inference_failed"
    assert errors == [boom]
    results = await asyncio.gather(*submit_all(batcher, [make_item(i) for i in range(3, 6)]))
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert [ok for _, _, ok in obs.done] == [False, True]
    assert batcher.running
    await batcher.close()


async def test_malformed_infer_output_is_an_inference_failure() -> None:
    async def wrong_rows(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((1, K), np.float32), np.zeros((1, D), np.float32)

    errors: list[BaseException] = []
    batcher = DynamicBatcher(
        wrong_rows, max_batch_size=2, max_delay_ms=10_000, max_queue_size=4, on_error=errors.append
    )
    await batcher.start()
    outcomes = await asyncio.gather(
        *submit_all(batcher, [make_item(0), make_item(1)]), return_exceptions=True
    )
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    assert isinstance(errors[0], ValueError) and "one row per input" in str(errors[0])
    await batcher.close()


# -- outputs postprocessed by the runtime ---------------------------------------------------


class DeviceRankedModel:
    """Return each batch as a device-postprocessed runtime does: ranked, logits on demand."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, bool]] = []  # (batch size, logits wanted)

    async def __call__(self, batch: list[np.ndarray], logits: bool) -> BatchOutputs:
        self.asked.append((len(batch), logits))
        rows = np.stack([item.reshape(-1)[:K] for item in batch])
        order = np.argsort(-rows, axis=1, kind="stable")[:, :2]
        return BatchOutputs(
            rows if logits else None,
            np.stack([np.full(D, item.mean(), np.float32) for item in batch]),
            ranked=(order, np.take_along_axis(rows, order, axis=1).astype(np.float64)),
            unit=np.zeros((len(batch), D), np.float32),
        )


async def test_infer_hears_whether_any_item_of_the_batch_wants_logits() -> None:
    model = DeviceRankedModel()
    batcher = DynamicBatcher(
        model, collate=list, max_batch_size=2, max_delay_ms=10_000, max_queue_size=8,
        pass_logits_wanted=True,
    )  # fmt: skip
    await batcher.start()
    items = [make_item(seed) for seed in range(4)]
    first = await asyncio.gather(
        batcher.submit(items[0], logits=False), batcher.submit(items[1], logits=False)
    )
    second = await asyncio.gather(
        batcher.submit(items[2], logits=False), batcher.submit(items[3], logits=True)
    )
    await batcher.close()
    assert model.asked == [(2, False), (2, True)]
    assert [r.logits.shape for r in first] == [(0,), (0,)]
    np.testing.assert_array_equal(second[0].logits, items[2].reshape(-1)[:K])
    for result, item in zip([*first, *second], items, strict=True):
        assert result.outputs is not None
        best = np.argsort(-item.reshape(-1)[:K], kind="stable")[:2]
        assert result.outputs.best(result.row, 2)[0].tolist() == best.tolist()
        np.testing.assert_array_equal(result.embedding, np.full(D, item.mean(), np.float32))


async def test_without_the_flag_infer_is_called_with_the_batch_alone() -> None:
    model = FakeModel()
    batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=0, max_queue_size=4)
    await batcher.start()
    result = await batcher.submit(make_item(5), logits=False)  # a hint this infer ignores
    await batcher.close()
    np.testing.assert_array_equal(result.logits, expected(make_item(5))[0])


async def test_ranked_outputs_with_the_wrong_rows_are_an_inference_failure() -> None:
    async def short_ranking(batch: np.ndarray) -> BatchOutputs:
        rows = len(batch)
        return BatchOutputs(
            None, np.zeros((rows, D), np.float32), ranked=(np.zeros((1, 2)), np.zeros((1, 2)))
        )

    errors: list[BaseException] = []
    batcher = DynamicBatcher(
        short_ranking, max_batch_size=2, max_delay_ms=10_000, max_queue_size=4,
        on_error=errors.append,
    )  # fmt: skip
    await batcher.start()
    outcomes = await asyncio.gather(
        *submit_all(batcher, [make_item(0), make_item(1)]), return_exceptions=True
    )
    await batcher.close()
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    assert "ranked indices" in str(errors[0])


# -- misc -----------------------------------------------------------------------------------


async def test_broken_observer_does_not_break_serving() -> None:
    class Exploding(NullObserver):
        def queue_depth(self, depth: int) -> None:
            raise RuntimeError("metrics bug")

        def batch_done(self, size: int, seconds: float, ok: bool) -> None:
            raise RuntimeError("metrics bug")

    batcher = DynamicBatcher(
        FakeModel(), max_batch_size=2, max_delay_ms=0, max_queue_size=4, observer=Exploding()
    )
    await batcher.start()
    assert (await batcher.submit(make_item(0))).batch_size == 1
    await batcher.close()


def test_error_codes() -> None:
    assert {c.code for c in (QueueFull, DeadlineExceeded, BatcherClosed, InferenceFailed)} == {
        "queue_full",
        "deadline_exceeded",
        "shutting_down",
        "inference_failed",
    }
    assert all(
        issubclass(c, BatcherError)
        for c in (QueueFull, DeadlineExceeded, BatcherClosed, InferenceFailed)
    )
