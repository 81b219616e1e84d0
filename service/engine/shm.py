"""Shared memory of the corridor: the engine's board and each front end's slots.

Both live in anonymous memory files (`memfd_create`) whose descriptors pass over the corridor's
Unix socket (SCM_RIGHTS), so nothing has a name to leak when a process dies: the memory goes
when the last process holding it does.

The board is the engine's: its state, capacity and pace for every front end to read, and one
cell per front end with the images that front end has admitted. A front end admits against the
sum of all cells under a POSIX record lock (`lockf`: per process, unlike `flock`, which the
shared open file would defeat), so front ends together never admit more than the capacity and
no request costs a round trip to the engine. Each front end writes only its own cell.

The slots are a front end's: fixed places that hold one model input each (a uint8 crop, a
float32 tensor in the tensor pool, or an encoded JPEG's bytes for an engine that decodes on its
device), followed by room for that input's outputs. The front end
writes the input once; the engine reads it in place and writes the outputs back beside it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import math
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_FRONT_ENDS = 256
_MAGIC = 0x48494552  # "HIER"

# Board fields (float64 each), then one cell per front end.
MAGIC, GENERATION, STATE, CAPACITY, IMAGE_SECONDS, DRAIN_RATE, HEARTBEAT, PID = range(8)
_CELLS = 16
BOARD_BYTES = (_CELLS + MAX_FRONT_ENDS) * 8
STATES = ("loading", "ready", "draining", "failed", "stopped")


def memory_file(name: str, size: int) -> tuple[int, mmap.mmap]:
    """Create an anonymous shared memory file of `size` bytes; return its fd and a mapping."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


class Board:
    """The engine's state and every front end's admitted images, in shared memory."""

    def __init__(self, fd: int, buffer: mmap.mmap, *, cell: int | None = None) -> None:
        self.fd = fd
        self._buffer = buffer
        self.values = np.frombuffer(buffer, dtype=np.float64)
        self.cell = cell  # this front end's cell; None in the engine

    @classmethod
    def create(cls, generation: int) -> Board:
        """Make a new board (in the engine), state loading."""
        fd, buffer = memory_file("hiera-board", BOARD_BYTES)
        board = cls(fd, buffer)
        board.values[MAGIC] = _MAGIC
        board.values[GENERATION] = generation
        board.values[PID] = os.getpid()
        board.set_state("loading")
        board.beat()
        return board

    @classmethod
    def attach(cls, fd: int, cell: int) -> Board:
        """Map a board received from an engine, as the front end that owns `cell`."""
        buffer = mmap.mmap(fd, BOARD_BYTES)
        board = cls(fd, buffer, cell=cell)
        if board.values[MAGIC] != _MAGIC:
            raise ValueError("not an engine board")
        return board

    # The engine's side.
    def set_state(self, state: str) -> None:
        self.values[STATE] = STATES.index(state)

    def publish(self, *, capacity: int, image_seconds: float, drain_rate: float | None) -> None:
        self.values[CAPACITY] = capacity
        self.values[IMAGE_SECONDS] = image_seconds
        self.values[DRAIN_RATE] = drain_rate or 0.0

    def beat(self) -> None:
        """Say the engine's loop is alive (front ends treat a stale beat as a hung engine)."""
        self.values[HEARTBEAT] = time.monotonic()

    def clear(self, cell: int) -> None:
        """Forget a gone front end's admitted images (once none of them is in the engine)."""
        self.values[_CELLS + cell] = 0

    # What everyone reads.
    @property
    def state(self) -> str:
        return STATES[int(self.values[STATE])]

    @property
    def capacity(self) -> int:
        return int(self.values[CAPACITY])

    @property
    def generation(self) -> int:
        return int(self.values[GENERATION])

    def beat_age(self) -> float:
        return time.monotonic() - float(self.values[HEARTBEAT])

    def backlog_seconds(self, images: int) -> float | None:
        per_image = float(self.values[IMAGE_SECONDS])
        return images * per_image if per_image > 0 else None

    @property
    def drain_rate(self) -> float | None:
        rate = float(self.values[DRAIN_RATE])
        return rate if rate > 0 else None

    # The ledger a front end's admission counts in (service.admission.Ledger).
    @property
    def outstanding(self) -> int:
        return int(self.values[_CELLS:].sum())

    @property
    def mine(self) -> int:
        assert self.cell is not None
        return int(self.values[_CELLS + self.cell])

    def take(self, count: int, capacity: int) -> bool:
        """Count `count` images in this front end's cell if every cell's sum stays in bounds."""
        assert self.cell is not None
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if self.values[_CELLS:].sum() + count > capacity:
                return False
            self.values[_CELLS + self.cell] += count
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def give(self, count: int) -> None:
        assert self.cell is not None
        self.values[_CELLS + self.cell] -= count

    def set_mine(self, count: int) -> None:
        """Write this front end's admitted images (one writer per cell: no lock needed)."""
        assert self.cell is not None
        self.values[_CELLS + self.cell] = count

    @property
    def pid(self) -> int:
        return int(self.values[PID])


@dataclass(frozen=True)
class SlotLayout:
    """Where an input and its outputs lie in one slot."""

    input_shape: tuple[int, ...]  # [3, H, W] for crops and tensors; [bytes] for JPEGs
    input_dtype: str  # "uint8" or "float32"
    max_k: int
    embed_dim: int
    num_classes: int

    def to_dict(self) -> dict[str, Any]:
        """Return the layout as JSON-ready data (what a front end tells its engine)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlotLayout:
        return cls(**{**data, "input_shape": tuple(data["input_shape"])})

    @property
    def input_bytes(self) -> int:
        return math.prod(self.input_shape) * np.dtype(self.input_dtype).itemsize

    @property
    def slot_bytes(self) -> int:
        outputs = 4 * (2 * self.max_k + self.embed_dim + self.num_classes)
        return -(-(self.input_bytes + outputs) // 64) * 64  # cache-line aligned


class Slots:
    """A pool of slots in one shared memory file, with views of each slot's parts."""

    def __init__(self, fd: int, buffer: mmap.mmap, layout: SlotLayout, count: int) -> None:
        self.fd = fd
        self.layout = layout
        self.count = count
        self.buffer = buffer
        raw = np.frombuffer(buffer, dtype=np.uint8).reshape(count, layout.slot_bytes)
        n_in = layout.input_bytes
        self._slot_bytes, self._input_bytes = layout.slot_bytes, n_in
        self.inputs = raw[:, :n_in].view(layout.input_dtype).reshape(count, *layout.input_shape)
        k, d, c = layout.max_k, layout.embed_dim, layout.num_classes
        out = raw[:, n_in : n_in + 4 * (2 * k + d + c)]
        self.indices = out[:, : 4 * k].view(np.int32)
        self.scores = out[:, 4 * k : 8 * k].view(np.float32)
        self.embedding = out[:, 8 * k : 8 * k + 4 * d].view(np.float32)
        self.logits = out[:, 8 * k + 4 * d :].view(np.float32)
        # The indices, scores and embedding together, as 4-byte words: written in one copy.
        self.head = out[:, : 8 * k + 4 * d].view(np.int32)

    def outputs_at(self, slot: int) -> int:
        """Return where a slot's outputs begin in `buffer` (its top-k indices first)."""
        return slot * self._slot_bytes + self._input_bytes

    @classmethod
    def create(cls, layout: SlotLayout, count: int, name: str) -> Slots:
        fd, buffer = memory_file(name, layout.slot_bytes * count)
        return cls(fd, buffer, layout, count)

    @classmethod
    def attach(cls, fd: int, layout: SlotLayout, count: int) -> Slots:
        return cls(fd, mmap.mmap(fd, layout.slot_bytes * count), layout, count)
