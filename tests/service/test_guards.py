"""Guards that a refactor could silently drop: each test fails if its guard goes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.app import create_app
from tests.service.helpers import make_image, repository_settings, running, sample, serving
from tests.service.test_lifecycle import JPEG, Gate


async def test_incoming_request_id_is_kept(micro_repository: Path) -> None:
    async with running(create_app(repository_settings(micro_repository))) as client:
        answer = await client.post(
            "/v1/classify", content=b"", headers=JPEG | {"X-Request-ID": "trace-abc-123"}
        )
    assert answer.headers["x-request-id"] == "trace-abc-123"
    assert answer.json()["error"]["request_id"] == "trace-abc-123"


async def test_declared_length_over_the_limit_is_refused_before_reading(
    micro_repository: Path,
) -> None:
    app = create_app(repository_settings(micro_repository, max_body_bytes=4096))

    async with running(app) as client:

        async def body() -> object:
            # Streamed: only 10 bytes would ever arrive, the header claims a million.
            yield b"0123456789"

        answer = await client.post(
            "/v1/classify",
            content=body(),
            headers=JPEG | {"Content-Length": "1000000"},
        )
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "body_too_large")
    assert sample(app, "hiera_failures_total", reason="body_too_large") == 1


async def test_every_instance_runs_a_batch_at_once(micro_repository: Path) -> None:
    app = create_app(
        repository_settings(micro_repository, instances_per_device=2, max_batch_size=1)
    )
    async with running(app) as client:
        gates = []
        for instance in app.state.service.pool.instances:
            gate = Gate(instance.backend)
            instance.backend = gate
            gates.append(gate)
        posts = [
            asyncio.create_task(client.post("/v1/embed", content=make_image(i), headers=JPEG))
            for i in range(2)
        ]
        # Both instances hold a batch at the same time: the batcher runs one per instance.
        for gate in gates:
            await asyncio.to_thread(gate.entered.wait, 10)
        entered = [gate.entered.is_set() for gate in gates]
        for gate in gates:
            gate.opened.set()
        answers = await asyncio.gather(*posts)
    assert entered == [True, True]
    assert [a.status_code for a in answers] == [200, 200]


async def test_generated_request_ids_are_unique_and_differ_between_apps(
    micro_repository: Path,
) -> None:
    ids: list[str] = []
    for _ in range(2):  # two apps stand for two worker processes
        async with serving(micro_repository) as client:
            for _ in range(3):
                ids.append((await client.get("/v1/models")).headers["X-Request-ID"])
    assert len(set(ids)) == 6 and all(len(i) == 32 and i.isalnum() for i in ids)
    assert ids[0][:16] == ids[2][:16] != ids[3][:16]  # one prefix per app, a counter after it
