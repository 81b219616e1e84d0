"""Admission control: accept or refuse a request before any of its images is decoded.

Every image counts from the moment it is admitted until its answer is ready, so the count
covers images being decoded, queued and running. A request for n images is admitted whole or
refused whole, and a refusal carries a Retry-After computed from the measured drain rate.

A request is also refused when the images already admitted would keep the model busy past
its deadline (at the recent model time per image): under sustained overload the excess then
gets a 429 at once instead of a 504 when its deadline runs out, and the model's time goes to
requests that can still be answered in time. An idle service admits anything.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol

from service.batching import QueueFull
from service.engine.state import DrainRate

_MIN_RETRY_S = 1
_MAX_RETRY_S = 60
_SHARED_POLL_S = 0.01  # how often a request waiting for shared room looks again


class Ledger(Protocol):
    """Where admitted images are counted: in this process, or shared by every front end."""

    @property
    def outstanding(self) -> int:
        """Images admitted and not yet answered, by everyone who shares the capacity."""
        ...

    @property
    def mine(self) -> int:
        """Images admitted by this process and not yet answered."""
        ...

    def take(self, count: int, capacity: int) -> bool:
        """Count `count` more images if the total stays within `capacity`; else count none."""
        ...

    def give(self, count: int) -> None:
        """Stop counting `count` of this process's images."""
        ...


class LocalLedger:
    """Count admitted images in this process alone."""

    def __init__(self) -> None:
        self._count = 0

    @property
    def outstanding(self) -> int:
        return self._count

    @property
    def mine(self) -> int:
        return self._count

    def take(self, count: int, capacity: int) -> bool:
        if self._count + count > capacity:
            return False
        self._count += count
        return True

    def give(self, count: int) -> None:
        self._count -= count


class Ticket:
    """The images one request was admitted with; release each once it has its answer."""

    def __init__(self, admission: Admission, count: int) -> None:
        self._admission = admission
        self._left = count

    @property
    def left(self) -> int:
        return self._left

    def release(self, count: int = 1, *, completed: bool = True) -> None:
        """Give back `count` images; `completed` ones also feed the drain-rate estimate."""
        count = min(count, self._left)
        if count <= 0:
            return
        self._left -= count
        self._admission._release(count, completed)

    def release_all(self) -> None:
        """Give back every image not yet released, without counting them as completed."""
        self.release(self._left, completed=False)


class Admission:
    """Count admitted images against a capacity and estimate how fast they drain."""

    def __init__(
        self,
        capacity: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
        max_wait_s: float | None = None,
        backlog_seconds: Callable[[int], float | None] | None = None,
        ledger: Ledger | None = None,
        drain_rate: Callable[[], float | None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # Shared with other front ends when the capacity is an engine's (service.engine.shm.Board).
        self._ledger: Ledger = ledger if ledger is not None else LocalLedger()
        # Where the drain rate comes from when others share the capacity (the engine measures
        # it); by default, from this process's own completions.
        self._drain_rate = drain_rate
        # Told the new outstanding count after every admit and release (e.g. a gauge's set).
        self._on_change = on_change
        # Recent completions: their count over their span is the drain rate.
        self._completions = DrainRate(clock)
        # The request deadline, and the model time n images need (None while unmeasured).
        self._max_wait_s = max_wait_s
        self._backlog_seconds = backlog_seconds
        self._room_waiters: list[asyncio.Future[None]] = []

    def admit(self, count: int = 1) -> Ticket:
        """Admit `count` images at once, or raise QueueFull (with a retry hint) for all of them."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        refused = self.refusal(count)
        if refused is not None:
            raise refused
        if not self._ledger.take(count, self.capacity):  # another front end took the room
            refused = self.refusal(count, full=True)
            assert refused is not None
            raise refused
        self._changed()
        return Ticket(self, count)

    @property
    def outstanding(self) -> int:
        """Return the images admitted and not yet answered (every front end's, if shared)."""
        return self._ledger.outstanding

    def refusal(self, count: int = 1, *, full: bool = False) -> QueueFull | None:
        """Return the error `admit(count)` would raise now, or None if it would admit."""
        outstanding = self.outstanding
        if full or outstanding + count > self.capacity:
            why = f"{outstanding} images already admitted (capacity {self.capacity})"
        elif outstanding and self._max_wait_s and self._backlog_seconds is not None:
            backlog = self._backlog_seconds(outstanding + count)
            if backlog is None or backlog <= self._max_wait_s:
                return None
            why = (
                f"{outstanding} images already admitted need about {backlog:.1f} s of "
                f"model time, past the {self._max_wait_s:g} s request timeout"
            )
        else:
            return None
        retry = self.retry_after_s()
        return QueueFull(f"{why}; retry in {retry} s or add capacity", retry_after_s=retry)

    def retry_after_s(self) -> int:
        """Return whole seconds until the current backlog should have drained."""
        rate = self.drain_rate
        if rate is None:
            return _MIN_RETRY_S
        seconds = math.ceil(self.outstanding / rate)
        return max(_MIN_RETRY_S, min(_MAX_RETRY_S, seconds))

    @property
    def drain_rate(self) -> float | None:
        """Return images completed per second over the recent completions, None if unknown."""
        if self._drain_rate is not None:
            return self._drain_rate()
        return self._completions.rate

    def freed(self) -> asyncio.Future[None]:
        """Return a future that resolves at the next release, when room may have freed.

        With a shared ledger other front ends' releases are not heard here: it also resolves
        after a short poll interval, so a waiting request sees their room too.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._room_waiters.append(waiter)
        if not isinstance(self._ledger, LocalLedger):
            loop.call_later(_SHARED_POLL_S, _resolve, waiter)
        return waiter

    def _release(self, count: int, completed: bool) -> None:
        self._ledger.give(count)
        if completed and self._drain_rate is None:
            self._completions.completed(count)
        self._changed()
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            _resolve(waiter)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._ledger.mine)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
