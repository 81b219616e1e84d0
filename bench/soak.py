"""Soak: steady load against a running hiera-serve for minutes; RSS after warm-up vs at the end.

    python -m bench.soak --url http://127.0.0.1:8000 --pid <server pid> --seconds 300 --rate 8

Requests go out open-loop at `--rate` per second (JPEG 500x375). The server's resident set size
is read from /proc/<pid>/status (VmRSS, plus every child's with --workers) once warm-up ends and
at the end; growth over `--max-growth` (5%) exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def rss_bytes(pid: int) -> int:
    """Return the resident set size of `pid` and its children, from /proc."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((500, 375), Image.Resampling.BILINEAR).save(buffer, "JPEG")
    return buffer.getvalue()


async def _load(url: str, rate: float, seconds: float, codes: dict[int, int]) -> None:
    images = [_jpeg(seed) for seed in range(16)]
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> None:
            try:
                answer = await client.post(
                    f"{url}/v1/classify",
                    content=images[i % len(images)],
                    headers={"Content-Type": "image/jpeg"},
                )
                codes[answer.status_code] = codes.get(answer.status_code, 0) + 1
            except httpx.HTTPError:
                codes[0] = codes.get(0, 0) + 1

        started = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print RSS at the start and the end; exit 1 on too much growth."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the hiera-serve process")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second")
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    warm: dict[int, int] = {}
    asyncio.run(_load(args.url, args.rate, args.warmup_seconds, warm))
    start = rss_bytes(args.pid)
    print(f"RSS after {args.warmup_seconds:g} s warm-up: {start / 2**20:.1f} MiB", flush=True)
    codes: dict[int, int] = {}
    asyncio.run(_load(args.url, args.rate, args.seconds, codes))
    end = rss_bytes(args.pid)
    growth = end / start - 1
    print(f"RSS after {args.seconds:g} s at {args.rate:g} req/s: {end / 2**20:.1f} MiB "
          f"({growth:+.2%}); answers by status: {dict(sorted(codes.items()))}")  # fmt: skip
    if args.out is not None:
        figures = {"rss_start_bytes": start, "rss_end_bytes": end, "growth": growth,
                   "seconds": args.seconds, "rate": args.rate, "codes": codes}  # fmt: skip
        args.out.write_text(json.dumps(figures, indent=2))
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
