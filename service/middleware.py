"""ASGI middleware: request ids, body-size limit, request metrics, and the last-resort 500."""

from __future__ import annotations

import itertools
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_response, to_api_error
from service.logs import request_id_var
from service.metrics import RECEIVED_SCOPE_KEY, Metrics

REQUEST_ID_HEADER = b"x-request-id"
# When a request arrived, if something in front of this middleware read its body first.
ARRIVED_SCOPE_KEY = "hiera.arrived"


class RequestIds:
    """A request's id: the client's `X-Request-ID` if it sent a sane one, else a new one.

    New ids are a random prefix and a counter: unique across processes and restarts like a
    uuid4, at a fraction of its cost (uuid4 reads the OS's random source on every call, which
    showed in profiles of refusal bursts). The prefix is made at the first id, so in the
    serving process, not in a parent that forks workers.
    """

    def __init__(self) -> None:
        self._prefix: str | None = None
        self._counter = itertools.count(1)

    def of(self, incoming: bytes | None) -> str:
        """Return the id for a request whose X-Request-ID header was `incoming`."""
        if incoming:
            text = incoming.decode("latin-1")[:128]
            if text.isprintable():
                return text
        if self._prefix is None:
            self._prefix = secrets.token_hex(8)
        return f"{self._prefix}{next(self._counter):016x}"


class RequestContextMiddleware:
    """Tag every request with an id, refuse oversized bodies early, time it, and answer once."""

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, ids: RequestIds
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.ids = ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = self.ids.of(headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(request_id)
        status: int | None = None
        started = scope.get(ARRIVED_SCOPE_KEY) or time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
            await send(message)

        self.metrics.in_flight.inc()
        declared = headers.get(b"content-length", b"")
        declared_bytes = int(declared) if declared.isdigit() else None
        try:
            await self.app(scope, self._limited(receive, declared_bytes), send_with_id)
        except Exception as exc:
            # An error no handler claimed: log it, and answer with a generic 500 that carries
            # the request id, unless a response is already on the wire.
            if status is not None:
                raise
            await error_response(exc)(scope, receive, send_with_id)
            self.metrics.failed(to_api_error(exc).code)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            received = bool(scope.get(RECEIVED_SCOPE_KEY))
            self.metrics.request_done(_endpoint(scope), status or 500, elapsed, received=received)
            request_id_var.reset(token)

    def _too_large(self) -> ApiError:
        return ApiError(413, "body_too_large", f"request body exceeds {self.max_body_bytes} bytes")

    def _limited(self, receive: Receive, declared_bytes: int | None) -> Receive:
        """Refuse an over-long body at the first read, before any of it is buffered.

        The route is resolved by then, so the 413 is counted under its real endpoint. A chunked
        upload declares no length: its bytes are counted as they stream in.
        """
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared_bytes is not None and declared_bytes > self.max_body_bytes:
                raise self._too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        return limited_receive


def _endpoint(scope: Scope) -> str:
    """Return the matched route's name (set by the router), so labels stay a small fixed set."""
    route = scope.get("route")
    if route is not None:
        return str(route.name)
    # Plain Starlette routes (/docs, /openapi.json) only leave their endpoint function.
    endpoint = scope.get("endpoint")
    return str(getattr(endpoint, "__name__", "unmatched"))
