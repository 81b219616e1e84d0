"""A hiera-serve process whose model is a fixed-latency sleep, for `hiera-bench --frontend`.

Run as a script (not `-m`), so PYTHONPATH can point `service` at another source tree (an
older commit) and both are measured by the same harness. The model is replaced only here, in
the benchmark: the sleep releases the GIL like a GPU call, so every CPU cycle the process spends
is front-end cost (HTTP, decode, preprocess, batching, postprocess, metrics).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import numpy as np


class SleepBackend:
    """Answer every batch after `latency_s` with fixed random outputs, using no CPU."""

    name = "sleep"
    device = "cpu"
    precision = "fp32"
    provider = "sleep"
    input_dtype = "float32"

    def __init__(self, latency_s: float, max_batch: int, classes: int, embed_dim: int) -> None:
        rng = np.random.default_rng(0)
        self._latency_s = latency_s
        self._logits = rng.standard_normal((max_batch, classes), dtype=np.float32)
        self._embedding = rng.standard_normal((max_batch, embed_dim), dtype=np.float32)

    def infer(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(self._latency_s)
        size = batch.shape[0]
        return self._logits[:size].copy(), self._embedding[:size].copy()

    def close(self) -> None:
        """Nothing to release."""


def thread_cpu() -> dict[str, Any]:
    """Return this process's CPU seconds, in total and per live thread (by thread name)."""
    threads = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            threads[thread.name] = time.clock_gettime(clock)
        except OSError:  # the thread ended between enumerate() and the read
            continue
    return {"process": time.process_time(), "threads": threads}


async def http_floor(request: Any) -> Any:
    """Read the body and answer a constant: the HTTP + framework + middleware cost alone."""
    from starlette.responses import Response

    await request.body()
    return Response(b'{"ok":true}', media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--decode-threads", type=int, default=4)
    parser.add_argument("--variant", default="hiera_tiny_224")
    args = parser.parse_args()

    import importlib

    import uvicorn

    import service.app
    import service.cli
    from model.labels import class_names
    from model.variants import get_variant
    from service.app import create_app
    from service.runtime.loader import LoadPlan, ModelCard, preprocessing_of
    from service.settings import Settings

    variant = get_variant(args.variant)
    card = ModelCard(
        name=f"{variant.name}-sleep",
        variant=variant.name,
        preprocessing=preprocessing_of(variant),
        embed_dim=variant.embed_dim,
        num_classes=variant.num_classes,
        labels=class_names(variant)[0],
        weights_source="none (sleep backend)",
        weights_kind="random",
        weights_sha256="",
        weights_license="n/a",
        repository=None,
    )

    def backend() -> SleepBackend:
        return SleepBackend(
            args.latency_ms / 1e3, args.max_batch_size, variant.num_classes, variant.embed_dim
        )

    # The engine loads through plan() (service.inference did, before the engine split).
    loads = next(
        (m for name in ("service.engine.core", "service.inference")
         if hasattr(m := importlib.import_module(name), "plan")),
        None,
    )  # fmt: skip
    if loads is None:
        raise SystemExit("the service no longer loads through plan(): update the bench")
    loads.plan = lambda settings: LoadPlan(card, [("cpu", backend)])  # type: ignore[attr-defined]
    settings = Settings(
        weights="random",
        device="cpu",
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        decode_threads=args.decode_threads,
        max_queue_size=4096,
        log_format="text",
        log_level="warning",
    )

    def create_measured_app(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        app.add_api_route("/bench/cpu", thread_cpu, methods=["GET"], include_in_schema=False)
        app.add_api_route("/bench/floor", http_floor, methods=["POST"], include_in_schema=False)
        return app

    if hasattr(service.cli, "serve"):
        # The service's own entry point: its uvicorn options and process setup are measured.
        service.app.create_app = create_measured_app
        service.cli.serve(settings)
        return
    # Older trees (before `serve` existed) ran uvicorn's defaults without uvloop/httptools
    # installed, i.e. the asyncio loop and the h11 parser.
    uvicorn.run(
        create_measured_app(settings),
        host=settings.host,
        port=settings.port,
        loop="asyncio",
        http="h11",
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()
