"""The app factory: `create_app(settings)` builds everything; importing this does nothing."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import disable_created_metrics, start_http_server
from starlette.types import ASGIApp

from service.auth import ApiKeyMiddleware, KeyRing, load_keys
from service.errors import install_handlers
from service.front import FrontPolicy
from service.inference import InferenceService
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware, RequestIds
from service.refusal_gate import RefusalGate
from service.responses import JSONResponse
from service.routes import health, kserve_v2, native, openai, triton
from service.routes.direct import DirectLane
from service.settings import Settings

log = logging.getLogger(__name__)

FatalCallback = Callable[[BaseException], None]


def create_app(
    settings: Settings,
    *,
    on_fatal: FatalCallback | None = None,
    on_broken: FatalCallback | None = None,
    metrics_listener: bool = True,
) -> FastAPI:
    """Build the FastAPI app; the model loads in the background once the server starts.

    `on_fatal` is called if loading fails (the CLI uses it to exit non-zero); readiness stays
    false either way, so an orchestrator never routes traffic to a server without a model.
    `on_broken` is called once if the loaded runtime breaks for good (a worker exits on it, so
    the supervisor restarts it); liveness fails either way. With `settings.metrics_port` set,
    `metrics_listener` says whether this process serves that port (one worker of several does).
    """
    # The *_created series double /metrics for no dashboard use; process-wide, set per app.
    disable_created_metrics()
    metrics = Metrics(workers=settings.workers, shared=settings.engine_socket is not None)
    service = InferenceService(settings, metrics, on_broken=on_broken)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(service, on_fatal), name="hiera-load")
        grpc = None
        if settings.grpc_port is not None:
            from service.grpc_server import start_grpc  # grpcio only when asked for

            grpc = await start_grpc(app)
        listener = None
        if settings.metrics_port is not None and metrics_listener:
            listener = start_http_server(
                settings.metrics_port, addr=settings.host, registry=metrics.registry
            )
        try:
            yield
        finally:
            if grpc is not None:
                await grpc.stop(settings.drain_timeout_s)
            if listener is not None:
                listener[0].shutdown()
                listener[0].server_close()
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
            await service.close()

    app = GatedFastAPI(
        title="hiera-serve",
        summary="Hiera image classification and embeddings over HTTP",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSONResponse,
        # Off, the schema and the UIs are simply not routed (404).
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
        **_no_native_telemetry(),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    ids = RequestIds()
    keys = load_keys((k.get_secret_value() for k in settings.api_keys), settings.api_keys_file)
    ring = KeyRing(keys) if keys else None
    app.state.keys = ring
    # Added innermost first: request ids and metrics wrap CORS, which wraps the key check (so
    # a preflight and a 401 both carry CORS headers, and a 401 carries a request id).
    if ring is not None:
        app.add_middleware(ApiKeyMiddleware, keys=ring, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        ids=ids,
    )
    # In front of all of it, the refusal gate (only authenticated callers learn that the
    # service is full), then the direct lane for plain single-image requests.
    policy = FrontPolicy(settings.max_body_bytes, ring, cors=bool(settings.cors_origins))

    def front(stack: ASGIApp) -> ASGIApp:
        lane = DirectLane(stack, service=service, metrics=metrics, ids=ids, policy=policy)
        return RefusalGate(
            lane,
            routes=[*native.router.routes, *kserve_v2.router.routes, *openai.router.routes],
            refusal=service.refusal,
            metrics=metrics,
            ids=ids,
            policy=policy,
        )

    app.front = front
    install_handlers(app)
    app.include_router(native.router)
    app.include_router(health.router)
    app.include_router(triton.router)  # first: /v2/models/stats before /v2/models/{name}
    app.include_router(kserve_v2.router)
    app.include_router(openai.router)
    if settings.metrics_port is None:
        app.include_router(health.metrics_router)
    return app


class GatedFastAPI(FastAPI):
    """FastAPI with `front` wrapped around its whole middleware stack, error handling and
    all: what answers there costs the event loop the least (service.refusal_gate)."""

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


def _no_native_telemetry() -> dict[str, Any]:
    """Turn off FastAPI's built-in OpenTelemetry hooks (FastAPI >= 0.16x): /metrics is ours.

    Left on, FastAPI checks the global OTel providers on every request, even when none is set.
    """
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    return {"telemetry": off}


async def _load(service: InferenceService, on_fatal: FatalCallback | None) -> None:
    try:
        await service.load()
    except Exception as exc:  # already logged and reflected in readiness by service.fail
        if on_fatal is not None:
            on_fatal(exc)
    finally:
        service.loaded.set()
