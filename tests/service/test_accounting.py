"""Accounting with a real server: every request received ends in exactly one outcome.

One burst mixes what a busy service meets: far more requests than its capacity, invalid
inputs, clients that give up, a request that misses its deadline and one whose batch fails,
over every inference API (native single and batch, KServe v2, OpenAI). Afterwards each client
must have had exactly one answer (or hung up), and one /metrics scrape alone must show
`received == ok + rejected + invalid + cancelled + timed_out + failed`, term by term equal to
what the clients saw.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.fault_server import commanded_server
from tests.service.helpers import make_image
from tests.service.test_failures_e2e import poll, scrape, value

pytestmark = pytest.mark.slow

JPEG = {"Content-Type": "image/jpeg"}
INFERENCE = ("classify", "embed", "classify_batch", "kserve_infer", "openai_embeddings")
# What the client saw, written out here rather than taken from the service.
SEEN_AS = {200: "ok", 400: "invalid", 415: "invalid", 422: "invalid", 429: "rejected",
           500: "failed", 503: "rejected", 504: "timed_out"}  # fmt: skip
HUNG_UP = "cancelled"
CANCELLED = "hiera_request_outcomes_total"
CORRUPT = b"\xff\xd8\xff\xe0 this is not really a JPEG"


def _kserve(data: bytes) -> dict[str, Any]:
    """A binary KServe v2 request for one encoded image, as tritonclient sends it."""
    blob = struct.pack("<I", len(data)) + data
    header = json.dumps({
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "embedding"}],
    }).encode()  # fmt: skip
    return {"content": header + blob, "headers": {"Inference-Header-Content-Length":
                                                  str(len(header))}}  # fmt: skip


def _openai(data: bytes, **extra: Any) -> dict[str, Any]:
    uri = f"data:image/jpeg;base64,{base64.b64encode(data).decode()}"
    return {"json": {"model": "hiera", "input": [uri], **extra}}


def _batch(*images: bytes) -> dict[str, Any]:
    return {"files": [("images", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images)]}


PATHS = {
    "classify": "/v1/classify",
    "embed": "/v1/embed",
    "classify_batch": "/v1/classify/batch",
    "kserve_infer": "/v2/models/hiera_micro/infer",
    "openai_embeddings": "/v1/embeddings",
}


class Clients:
    """Send requests and tally what each client saw, by endpoint and outcome."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seen: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.responses: list[httpx.Response] = []

    async def send(
        self, endpoint: str, give_up_s: float | None = None, query: str = "", **request: Any
    ) -> httpx.Response | None:
        try:
            answer = await self.client.post(
                PATHS[endpoint] + query, timeout=give_up_s or 60, **request
            )
        except httpx.ReadTimeout:
            # Only clients told to give up may time out; httpx then closes the connection.
            assert give_up_s is not None
            self.seen[(endpoint, HUNG_UP)] += 1
            return None
        self.seen[(endpoint, SEEN_AS[answer.status_code])] += 1
        self.statuses[(endpoint, answer.status_code)] += 1
        self.responses.append(answer)
        return answer

    async def hang_up_mid_upload(self, url: str) -> None:
        """Send the headers and a tenth of the declared body, then close the connection."""
        data = make_image(99)
        parts = urlsplit(url)
        _, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            b"POST /v1/embed HTTP/1.1\r\nHost: hiera\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {10 * len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.seen[("embed", HUNG_UP)] += 1


def test_every_request_received_has_exactly_one_outcome(
    micro_repository: Path, tmp_path: Path
) -> None:
    # Capacity 4 images (3 queued + 1 running), batches of 1 that take 1.5 s, 2 s deadlines.
    args = ("--max-queue-size", "3", "--max-batch-size", "1", "--no-batch-cap-from-warmup",
            "--request-timeout-s", "2")  # fmt: skip
    with commanded_server(micro_repository, tmp_path, *args) as server:
        url = server.url
        server.command(delay_s=1.5)

        def at(name: str, count: float) -> bool:
            return value(scrape(url), name) == count

        async def scenario() -> Clients:
            async with httpx.AsyncClient(base_url=url) as client:
                clients = Clients(client)
                # A runs in the model for 1.5 s: ok.
                first = asyncio.create_task(
                    clients.send("classify", content=make_image(0), headers=JPEG)
                )
                await asyncio.to_thread(poll, lambda: at("hiera_batch_size_count", 1), "A", server)
                # Two clients that give up after 1 s while queued (cancelled), and T, which
                # reaches the model at 1.5 s and cannot finish by its 2 s deadline (timed out).
                waiting = [
                    clients.send("embed", give_up_s=1.0, content=make_image(1), headers=JPEG),
                    clients.send("openai_embeddings", give_up_s=1.0, **_openai(make_image(2))),
                    clients.send("kserve_infer", **_kserve(make_image(3))),
                ]
                waiting_tasks = [asyncio.create_task(w) for w in waiting]
                await asyncio.to_thread(
                    poll, lambda: at("hiera_admitted_images", 4), "4 admitted", server
                )
                # The burst, at full capacity: valid requests are rejected, bad ones refused.
                burst = []
                for seed in range(10, 16):
                    image = make_image(seed)
                    burst += [
                        clients.send("classify", content=image, headers=JPEG),
                        clients.send("embed", content=image, headers=JPEG),
                        clients.send("classify_batch", **_batch(image, image)),
                        clients.send("kserve_infer", **_kserve(image)),
                        clients.send("openai_embeddings", **_openai(image)),
                    ]

                def invalid() -> list[Coroutine[Any, Any, Any]]:
                    return [
                        clients.send(
                            "classify", content=b"hello", headers={"Content-Type": "text/plain"}
                        ),
                        clients.send(
                            "classify", query="?top_k=0", content=make_image(4), headers=JPEG
                        ),
                        clients.send("embed", content=CORRUPT, headers=JPEG),
                        clients.send("kserve_infer", content=b"{not json"),
                        clients.send("openai_embeddings", json={"input": "data:,"}),
                    ]

                # While full, bad requests are refused at the door like good ones (429).
                await asyncio.gather(*burst, *invalid())
                await asyncio.gather(first, *waiting_tasks)
                # With room again (T's batch may still be in the model after its 504; while it
                # is, the door refuses even a request whose client is hanging up): the same bad
                # requests get their 4xx. Then, alone (the corrupt image holds a place while it
                # is decoded, and with 1.5 s of model time per image against a 2 s deadline one
                # admitted image is enough for the door to refuse), an upload abandoned
                # halfway (499).
                await asyncio.to_thread(
                    poll, lambda: at("hiera_admitted_images", 0), "room again", server
                )
                await asyncio.gather(*invalid())
                await asyncio.to_thread(
                    poll, lambda: at("hiera_admitted_images", 0), "room for the hang-up", server
                )
                cancelled = value(scrape(url), CANCELLED, endpoint="embed", outcome=HUNG_UP)
                await clients.hang_up_mid_upload(url)
                # Alone, as said: the next request is sent only once the server has counted
                # the hang-up (else it may be admitted first, and the door refuse the hang-up).
                await asyncio.to_thread(
                    poll,
                    lambda: (
                        value(scrape(url), CANCELLED, endpoint="embed", outcome=HUNG_UP)
                        == cancelled + 1
                    ),
                    "the hang-up counted",
                    server,
                )
                # One batch that raises (failed), then every API served once more (ok); the
                # batch request's corrupt image fails only its own entry.
                server.command(fail=1)
                await clients.send("embed", content=make_image(5), headers=JPEG)
                await clients.send("classify_batch", **_batch(make_image(6), CORRUPT))
                await clients.send("kserve_infer", **_kserve(make_image(7)))
                await clients.send("openai_embeddings", **_openai(make_image(8)))
                await clients.send("embed", content=make_image(9), headers=JPEG)
            return clients

        clients = asyncio.run(scenario())

        def settled() -> bool:  # hang-ups reach the server a moment after the client leaves
            now = scrape(url)
            received = sum(
                value(now, "hiera_requests_received_total", endpoint=e) for e in INFERENCE
            )
            answered = sum(
                s for (name, _), s in now.items() if name == "hiera_request_outcomes_total"
            )
            return received == answered == sum(clients.seen.values())

        poll(settled, "every request answered", server)
        metrics = scrape(url)  # the one scrape everything below is read from

    outcomes: Counter[tuple[str, str]] = Counter()
    received: Counter[str] = Counter()
    by_status: Counter[tuple[str, int]] = Counter()
    for (name, labels), count in metrics.items():
        tags = dict(labels)
        if name == "hiera_request_outcomes_total" and count:
            outcomes[(tags["endpoint"], tags["outcome"])] += int(count)
        elif name == "hiera_requests_received_total":
            received[tags["endpoint"]] += int(count)
        elif name == "hiera_requests_total" and tags["endpoint"] in INFERENCE:
            by_status[(tags["endpoint"], int(tags["status"]))] += int(count)

    # Term by term, the server counted what the clients saw.
    assert outcomes == clients.seen
    totals = Counter()
    for (_, outcome), count in outcomes.items():
        totals[outcome] += count
    terms = ("ok", "rejected", "invalid", "cancelled", "timed_out", "failed")
    assert sum(received.values()) == sum(totals[t] for t in terms)
    assert all(totals[t] > 0 for t in terms), totals
    for endpoint in INFERENCE:  # and per API, batch and protocol routes alike
        answered = sum(c for (e, _), c in outcomes.items() if e == endpoint)
        assert received[endpoint] == answered > 0, endpoint
        statuses = sum(c for (e, _), c in by_status.items() if e == endpoint)
        assert statuses == received[endpoint], endpoint
    # The answers the clients got were the ones counted, hang-ups as 499.
    hung_up = {e: c for (e, o), c in clients.seen.items() if o == HUNG_UP}
    assert {e: c for (e, s), c in by_status.items() if s == 499} == hung_up
    assert {k: c for k, c in by_status.items() if k[1] != 499} == clients.statuses
    assert hung_up == {"embed": 2, "openai_embeddings": 1}
    assert totals["timed_out"] == 1 and totals["failed"] == 1
    for answer in clients.responses:
        if answer.status_code in (429, 503):
            assert int(answer.headers["retry-after"]) >= 1
    # The two queued images whose clients left never reached the model; nothing is left over.
    assert value(metrics, "hiera_dropped_total", reason="cancelled") == 2
    assert value(metrics, "hiera_admitted_images") == 0
    assert value(metrics, "hiera_queue_depth") == 0
    assert value(metrics, "hiera_failures_total", reason="corrupt_image") >= 1
