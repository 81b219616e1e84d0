"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.inference import InferenceService
from service.responses import JSONResponse

router = APIRouter(tags=["operations"])
# Separate, so `--metrics-port` can leave it off the API port.
metrics_router = APIRouter(tags=["operations"])


@router.get("/health/live", summary="200 unless the model runtime is broken for good; 503 then")
async def live(request: Request) -> JSONResponse:
    service: InferenceService = request.app.state.service
    if service.broken:
        # Restarting is the only cure for a hung or persistently failing runtime.
        body = {"status": "broken", "reason": service.reason}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "alive"})


@router.get("/health/ready", summary="200 once the model is loaded and warmed; 503 otherwise")
async def ready(request: Request) -> JSONResponse:
    service: InferenceService = request.app.state.service
    ready, reason = service.ready, service.reason
    body: dict[str, object] = {"state": service.state}
    metrics = request.app.state.metrics
    if metrics.workers > 1:
        # Ready only when every worker is: the orchestrator sees one pod, not N processes.
        count = metrics.ready_workers()
        body["workers"] = {"ready": count, "total": metrics.workers, "pid": os.getpid()}
        if ready and count < metrics.workers:
            ready, reason = False, f"{count} of {metrics.workers} workers ready"
    body = {"status": "ready" if ready else "not_ready", **body, "reason": reason}
    if ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,  # documents text/plain, not the default JSON
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
