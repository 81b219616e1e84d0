"""Run a model on fixed batch buckets with static buffers: what CUDA graph replay needs.

A captured CUDA graph replays the exact kernels it recorded, on the exact addresses it
recorded: one graph per batch shape, reading one input buffer and writing one set of output
buffers. So batches are padded up to a *bucket* (the powers of two below `max_batch_size`, and
the maximum itself), copied into that bucket's static input, replayed, and their own rows
copied out before the next replay overwrites them. `BucketRunner` does that bookkeeping;
`CudaGraphs` captures and replays torch graphs, `StandIn` runs the module eagerly on the same
buffers so the bookkeeping is tested on a CPU, and `service.runtime.onnx_graphs` replays ONNX
Runtime's graphs through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Forward = Callable[[torch.Tensor], Sequence[torch.Tensor]]
# Eager runs before capture: cuDNN/cuBLAS pick their algorithms, TorchScript's profiling
# executor specialises and fuses, and lazily created state exists, none of which may happen
# inside a capture.
WARM_UP_RUNS = 3


def buckets(max_batch_size: int) -> list[int]:
    """Return the batch sizes graphs are captured at: powers of two below the maximum, and it."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = {max_batch_size}
    power = 1
    while power < max_batch_size:
        sizes.add(power)
        power *= 2
    return sorted(sizes)


def bucket_for(size: int, sizes: Sequence[int]) -> int:
    """Return the smallest bucket that holds a batch of `size`."""
    for bucket in sizes:
        if bucket >= size >= 1:
            return bucket
    raise ValueError(f"a batch of {size} does not fit the buckets {list(sizes)}")


@dataclass(frozen=True)
class StaticSpec:
    """The static input buffers' shape: `[bucket, *input_shape]` of `dtype` on `device`."""

    max_batch_size: int
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class BucketRunner:
    """Pad each batch to its bucket, run the bucket on static buffers, copy its rows out.

    Subclasses say how a bucket is set up (`_capture`) and run (`_replay`). Every call comes
    from the owning instance's thread; the outputs returned are copies, so the next replay
    cannot change them.
    """

    def __init__(self, spec: StaticSpec) -> None:
        self.buckets = buckets(spec.max_batch_size)
        self.max_batch_size = spec.max_batch_size
        self._spec = spec
        self._device = spec.device
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, tuple[torch.Tensor, ...]] = {}

    def prepare(self) -> None:
        """Allocate every bucket's static input and set the bucket up, largest first."""
        # Largest first: smaller graphs then reuse the shared pool's blocks instead of
        # growing it (PyTorch's advice for graphs that share a memory pool).
        for bucket in sorted(self.buckets, reverse=True):
            spec = self._spec
            static = torch.zeros((bucket, *spec.input_shape), dtype=spec.dtype, device=spec.device)
            self._inputs[bucket] = static
            self._outputs[bucket] = tuple(self._capture(bucket, static))

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return `batch`'s rows of the outputs, as copies the next call leaves alone."""
        size = batch.shape[0]
        bucket = bucket_for(size, self.buckets)
        static = self._inputs[bucket]
        static[:size].copy_(batch)
        # Zeros, not the previous batch's rows: the padding's (discarded) outputs then never
        # depend on other requests, and a replay is reproducible from its own inputs.
        static[size:].zero_()
        self._replay(bucket)
        return tuple(out[:size].clone() for out in self._outputs[bucket])

    def _capture(self, bucket: int, static: torch.Tensor) -> Sequence[torch.Tensor]:
        """Set `bucket` up to read `static`; return its static outputs."""
        raise NotImplementedError

    def _replay(self, bucket: int) -> None:
        """Run `bucket` on its static input, writing its static outputs."""
        raise NotImplementedError


class StandIn(BucketRunner):
    """Run `forward` eagerly on the static buffers: the bookkeeping of a graph, on any device."""

    def __init__(self, forward: Forward, spec: StaticSpec) -> None:
        super().__init__(spec)
        self._forward = forward

    def _capture(self, bucket: int, static: torch.Tensor) -> Sequence[torch.Tensor]:
        return [out.clone() for out in self._forward(static)]

    def _replay(self, bucket: int) -> None:
        produced = self._forward(self._inputs[bucket])
        for target, out in zip(self._outputs[bucket], produced, strict=True):
            target.copy_(out)  # into the static output, as a replay writes it


class CudaGraphs(BucketRunner):
    """Capture `forward` as one CUDA graph per bucket, all sharing one memory pool."""

    def __init__(self, forward: Forward, spec: StaticSpec) -> None:
        super().__init__(spec)
        self._forward = forward
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: Any = None  # an opaque handle from graph_pool_handle()

    def prepare(self) -> None:
        """Capture every bucket, then wait for the device so the first replay finds them."""
        self._pool = torch.cuda.graph_pool_handle()  # once: every bucket's graph shares it
        super().prepare()
        torch.cuda.synchronize(self._device)

    def _capture(self, bucket: int, static: torch.Tensor) -> Sequence[torch.Tensor]:
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                self._forward(static)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = list(self._forward(static))
        self._graphs[bucket] = graph
        return outputs

    def _replay(self, bucket: int) -> None:
        # On the caller's current stream: the instance's own, where its input was copied.
        self._graphs[bucket].replay()
