"""Access control and exposure: API keys, open probes, CORS, /docs off, /metrics elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from tests.service.helpers import free_port, make_image, repository_settings, running, sample

JPEG = {"Content-Type": "image/jpeg"}
KEY = "k-3f9a1c7e55d2"
OTHER = "k-second-key-0042"


async def test_keys_guard_everything_but_the_probes(
    micro_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated monthly\n{OTHER}\n\n")
    settings = repository_settings(micro_repository, api_keys=KEY, api_keys_file=key_file)
    app = create_app(settings)
    caplog.set_level(logging.DEBUG)
    async with running(app) as client:
        anonymous = await client.post("/v1/classify", content=make_image(0), headers=JPEG)
        wrong = await client.post(
            "/v1/classify", content=make_image(0), headers=JPEG | {"X-API-Key": KEY + "x"}
        )
        basic = await client.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
        bearer = await client.post(
            "/v1/classify", content=make_image(0), headers=JPEG | {"Authorization": f"Bearer {KEY}"}
        )
        header = await client.get("/v1/models", headers={"X-API-Key": OTHER})
        metrics = await client.get("/metrics")
        probes = [(await client.get(p)).status_code for p in ("/health/live", "/health/ready")]
    for refused in (anonymous, wrong, basic, metrics):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.json()["error"]["code"] == "unauthorized"
        assert "x-request-id" in refused.headers
    assert (bearer.status_code, header.status_code) == (200, 200)
    assert probes == [200, 200]
    assert sample(app, "hiera_failures_total", reason="unauthorized") == 4
    # Keys never leak: not in responses, logs, nor the settings' repr.
    for text in [r.text for r in (anonymous, wrong, basic, header)] + [caplog.text, repr(settings)]:
        assert KEY not in text and OTHER not in text


async def test_without_keys_everything_is_open_and_docs_can_be_hidden(
    micro_repository: Path,
) -> None:
    async with running(create_app(repository_settings(micro_repository))) as client:
        docs_on = [(await client.get(p)).status_code for p in ("/docs", "/openapi.json")]
        models = await client.get("/v1/models")
    app = create_app(repository_settings(micro_repository, docs=False))
    async with running(app) as client:
        docs_off = [(await client.get(p)).status_code for p in ("/docs", "/redoc", "/openapi.json")]
    assert docs_on == [200, 200] and models.status_code == 200
    assert docs_off == [404, 404, 404]


async def test_cors_is_off_by_default_and_follows_the_origin_list(micro_repository: Path) -> None:
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with running(create_app(repository_settings(micro_repository))) as client:
        off = await client.get("/v1/models", headers={"Origin": "https://app.example.com"})
    settings = repository_settings(
        micro_repository, cors_origins="https://app.example.com", api_keys=KEY
    )
    async with running(create_app(settings)) as client:
        allowed = await client.options("/v1/classify", headers=preflight)
        other = await client.options(
            "/v1/classify", headers=preflight | {"Origin": "https://evil.example"}
        )
        simple = await client.get(
            "/v1/models", headers={"Origin": "https://app.example.com", "X-API-Key": KEY}
        )
    assert "access-control-allow-origin" not in off.headers
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert simple.headers["access-control-allow-origin"] == "https://app.example.com"


async def test_metrics_port_moves_metrics_off_the_api(micro_repository: Path) -> None:
    port = free_port()
    app = create_app(repository_settings(micro_repository, metrics_port=port))
    async with running(app) as client:
        on_api = await client.get("/metrics")
        await client.post("/v1/embed", content=make_image(0), headers=JPEG)
        async with httpx.AsyncClient() as scraper:
            scraped = await scraper.get(f"http://127.0.0.1:{port}/metrics")
    assert on_api.status_code == 404
    assert scraped.status_code == 200
    assert 'hiera_requests_total{endpoint="embed",status="200"} 1.0' in scraped.text
    async with httpx.AsyncClient() as scraper:
        with pytest.raises(httpx.ConnectError):  # closed with the app
            await scraper.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
