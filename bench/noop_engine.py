"""An engine process whose model is a fixed-latency sleep (`hiera-bench --split`).

Started by bench/split_server.py's supervisor in place of service.engine.process: the same
engine and corridor, with the model replaced by bench/frontend_server.SleepBackend, so every
CPU cycle the engine spends is the engine's and the corridor's own. HIERA_BENCH_LATENCY_MS and
HIERA_BENCH_VARIANT say how long a batch sleeps and whose shapes it answers with.

With HIERA_BENCH_FEED=copy the batch is only stacked, not normalised: what an engine's CPU
does per image on a GPU host, where the uint8 crops are copied into a pinned buffer and
normalised on the device (service.runtime.feed). Without it the CPU path normalises on the host.
"""

from __future__ import annotations

import os
import sys


def device_like_feed() -> None:
    """Make the sleeping model take the stacked uint8 crops, as a GPU feeder uploads them."""
    import service.runtime.feed
    from bench.frontend_server import SleepBackend

    SleepBackend.input_dtype = "uint8"
    service.runtime.feed.normalize = lambda pixels, mean, std: pixels


def echo_engine(classes: int, embed_dim: int) -> None:
    """Answer every input at once with fixed outputs, without batcher or model: what is left
    is the corridor's own cost (frames, the outputs written to the slot)."""
    import numpy as np

    from service.batching import BatchResult
    from service.engine.core import Engine
    from service.postprocess import BatchOutputs

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, classes), dtype=np.float32)
    embedding = rng.standard_normal((1, embed_dim), dtype=np.float32)
    outputs = BatchOutputs(logits, embedding)
    answered: list[object] = []  # one settled future, the same answer for every input

    def enqueue(self: Engine, item: object, deadline: object, want: object = None) -> object:
        if not answered:
            import asyncio

            future = asyncio.get_running_loop().create_future()
            future.set_result(BatchResult(logits[0], embedding[0], 1, 0.0, 0.0, outputs, 0))
            answered.append(future)
        return answered[0]

    Engine.enqueue = enqueue  # type: ignore[assignment,method-assign]


def main() -> int:
    import service.engine.core
    from bench.frontend_server import sleep_plan
    from service.engine.process import main as engine_main

    if os.environ.get("HIERA_BENCH_FEED") == "copy":
        device_like_feed()
    if os.environ.get("HIERA_BENCH_ENGINE") == "echo":
        from model.variants import get_variant

        shapes = get_variant(os.environ.get("HIERA_BENCH_VARIANT", "hiera_tiny_224"))
        echo_engine(shapes.num_classes, shapes.embed_dim)
    latency_ms = float(os.environ.get("HIERA_BENCH_LATENCY_MS", "5"))
    variant = os.environ.get("HIERA_BENCH_VARIANT", "hiera_tiny_224")
    plan = sleep_plan(variant, latency_ms, 1024)
    service.engine.core.plan = lambda settings: plan
    return engine_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
