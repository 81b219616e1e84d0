"""Serve the gRPC face of the Open Inference Protocol beside the HTTP server.

`grpc.aio` on the same event loop as uvicorn: one loop, one InferenceService, so admission,
batching, metrics and readiness are shared with REST as they are between REST routes.
"""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI

from service.grpc_stubs import grpc_service_pb2_grpc as pb_grpc
from service.routes.grpc_v2 import InferenceServicer

log = logging.getLogger(__name__)


async def start_grpc(app: FastAPI) -> grpc.aio.Server:
    """Start serving `app`'s service over gRPC on settings.grpc_port; return the server.

    With several workers each binds the same port with SO_REUSEPORT and the kernel spreads
    connections over them, as it does for HTTP. Alone, the option is off, so a port that
    another process holds fails here instead of being silently shared.
    """
    settings = app.state.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ]
    )
    servicer = InferenceServicer(app.state.service, app.state.metrics, app.state.keys)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot serve gRPC on {address}: {exc}") from exc
    await server.start()
    log.info("serving gRPC (Open Inference Protocol) on %s", address)
    return server
