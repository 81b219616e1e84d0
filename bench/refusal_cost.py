"""CPU per refusal: the door (service.refusal_gate) against the app's own stack, in one run.

    python -m bench.refusal_cost --model-repository /tmp/bench/hiera_tiny_224 [--requests 3000]

The service loads, every admission slot is taken, and the same 429 is then asked for through
the app in process, without sockets: once as a plain upload (the door answers it) and once
as a chunked upload that declares no length (the door passes it on, and the route's
admission refuses it inside FastAPI). The two alternate in rounds, and the process's CPU
time per refusal is reported for each. uvicorn's own work per request comes on top of both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from service.app import create_app
from service.settings import Settings

Message = dict[str, Any]


async def measure(settings: Settings, *, requests: int, rounds: int) -> dict[str, Any]:
    """Return the median CPU microseconds per refusal of each path, and what they answered."""
    app = create_app(settings, metrics_listener=False)
    body = b"\xff\xd8" + b"\x00" * 20_000
    paths = {
        "door": [(b"content-length", str(len(body)).encode())],
        "stack": [(b"transfer-encoding", b"chunked")],
    }
    async with app.router.lifespan_context(app):
        service = app.state.service
        await service.loaded.wait()
        if not service.ready:
            raise SystemExit(f"the service did not load: {service.reason}")
        held = service.admit(service.admission.capacity)
        try:
            micros: dict[str, list[float]] = {name: [] for name in paths}
            statuses: dict[str, set[int]] = {name: set() for name in paths}
            for _ in range(rounds):
                for name, headers in paths.items():
                    seconds, seen = await _refusals(app, headers, body, requests)
                    micros[name].append(1e6 * seconds / requests)
                    statuses[name] |= seen
        finally:
            held.release_all()
    door, stack = statistics.median(micros["door"]), statistics.median(micros["stack"])
    return {
        "us_per_refusal": {"door": door, "stack": stack},
        "rounds_us": micros,
        "statuses": {name: sorted(seen) for name, seen in statuses.items()},
        "door_over_stack": door / stack,
    }


async def _refusals(
    app: Any, headers: list[tuple[bytes, bytes]], body: bytes, count: int
) -> tuple[float, set[int]]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/classify", "raw_path": b"/v1/classify",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"hiera"), (b"content-type", b"image/jpeg"), *headers],
    }  # fmt: skip
    statuses: set[int] = set()

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    started = time.process_time()
    for _ in range(count):
        await app(dict(scope, state={}), receive, send)
    return time.process_time() - started, statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=3000, help="refusals per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    settings = Settings(model_repository=args.model_repository, log_level="error")
    result = asyncio.run(measure(settings, requests=args.requests, rounds=args.rounds))
    us = result["us_per_refusal"]
    print(
        f"CPU per 429: door {us['door']:.1f} us, through the stack {us['stack']:.1f} us "
        f"({result['door_over_stack']:.2f}x); statuses {result['statuses']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
