"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.inference import InferenceService
from service.responses import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/health/live", summary="200 while the process runs")
async def live() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.get("/health/ready", summary="200 once the model is loaded and warmed; 503 otherwise")
async def ready(request: Request) -> JSONResponse:
    service: InferenceService = request.app.state.service
    body = {"status": "ready" if service.ready else "not_ready", "state": service.state,
            "reason": service.reason}  # fmt: skip
    if service.ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
