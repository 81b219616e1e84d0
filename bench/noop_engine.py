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


def main() -> int:
    import service.engine.core
    from bench.frontend_server import sleep_plan
    from service.engine.process import main as engine_main

    if os.environ.get("HIERA_BENCH_FEED") == "copy":
        device_like_feed()
    latency_ms = float(os.environ.get("HIERA_BENCH_LATENCY_MS", "5"))
    variant = os.environ.get("HIERA_BENCH_VARIANT", "hiera_tiny_224")
    plan = sleep_plan(variant, latency_ms, 1024)
    service.engine.core.plan = lambda settings: plan
    return engine_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
