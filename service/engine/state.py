"""Words both roles use about an engine: its states, what a caller wants back, its pace."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# How many recent completions the drain rate is measured over.
_RATE_SAMPLES = 256

EngineState = Literal["loading", "ready", "draining", "failed", "stopped"]


@dataclass(frozen=True)
class Want:
    """What one input's caller needs back: the `top_k` best classes (0 = none), the raw
    embedding, the full logits. Across the corridor only these cross back."""

    top_k: int = 0
    embedding: bool = False
    logits: bool = False


EVERYTHING = Want(top_k=0, embedding=True, logits=True)


class DrainRate:
    """Measure how fast admitted images are answered, over the recent completions."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._times: deque[float] = deque(maxlen=_RATE_SAMPLES)

    def completed(self, count: int) -> None:
        """Count `count` images answered now."""
        if count == 1:
            self._times.append(self._clock())
        else:
            self._times.extend([self._clock()] * count)

    @property
    def rate(self) -> float | None:
        """Return images completed per second, None while unknown."""
        times = self._times
        if len(times) < 2:
            return None
        span = max(self._clock(), times[-1]) - times[0]
        return (len(times) - 1) / span if span > 0 else None
