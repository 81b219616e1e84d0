"""Decide when model failures add up to a broken runtime: failed-batch streaks and hung batches.

One failed batch (a transient CUDA OOM, say) fails only its own requests. The runtime counts as
broken, so readiness and then liveness fail, only after `max_consecutive_failures` batches in a
row have failed, or when a batch has run longer than the watchdog allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class RuntimeBroken(Exception):
    """The runtime cannot serve any more: too many failed batches in a row, or a hung batch."""


class _Busy(Protocol):
    index: int
    busy_since: float | None


class RuntimeHealth:
    """Count failed batches in a row and watch running batches; call `on_broken` once."""

    def __init__(
        self,
        *,
        max_consecutive_failures: int,
        batch_timeout_s: float,
        on_broken: Callable[[BaseException], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_consecutive_failures < 1:
            raise ValueError(
                f"max_consecutive_failures must be >= 1, got {max_consecutive_failures}"
            )
        self.max_consecutive_failures = max_consecutive_failures
        self.batch_timeout_s = batch_timeout_s
        self.consecutive_failures = 0
        self.broken: BaseException | None = None
        self._on_broken = on_broken
        self._clock = clock
        self._watchdog: asyncio.Task[None] | None = None

    def batch_ok(self) -> None:
        """Reset the failure streak: the runtime just answered a batch."""
        self.consecutive_failures = 0

    def batch_failed(self, exc: BaseException) -> None:
        """Count one failed batch; at the limit, declare the runtime broken."""
        self.consecutive_failures += 1
        log.error(
            "batch inference failed (%d in a row, limit %d): %r",
            self.consecutive_failures, self.max_consecutive_failures, exc, exc_info=exc,
        )  # fmt: skip
        if self.consecutive_failures >= self.max_consecutive_failures:
            broken = RuntimeBroken(f"{self.consecutive_failures} batches in a row failed")
            broken.__cause__ = exc
            self._declare(broken)

    def watch(self, instances: Sequence[_Busy]) -> None:
        """Start the watchdog over `instances`; a batch running past the timeout breaks us."""
        if self.batch_timeout_s <= 0 or self._watchdog is not None:
            return
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(instances), name="hiera-watchdog"
        )

    async def stop(self) -> None:
        """Stop the watchdog."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    def hung(self, instances: Sequence[_Busy]) -> list[int]:
        """Return the indices of instances whose current batch is past the timeout."""
        now = self._clock()
        return [
            i.index
            for i in instances
            if i.busy_since is not None and now - i.busy_since > self.batch_timeout_s
        ]

    async def _watch(self, instances: Sequence[_Busy]) -> None:
        # A quarter of the timeout: a hang is seen at most 25% late, at negligible cost.
        period = self.batch_timeout_s / 4
        while self.broken is None:
            await asyncio.sleep(period)
            if stuck := self.hung(instances):
                self._declare(
                    RuntimeBroken(
                        f"a batch on instance {stuck[0]} has run for over "
                        f"{self.batch_timeout_s:g} s (batch_timeout_s)"
                    )
                )

    def _declare(self, broken: RuntimeBroken) -> None:
        if self.broken is not None:
            return
        self.broken = broken
        self._on_broken(broken)
