"""Count every request an inference route receives, before anything about it can fail.

Mark an endpoint with `@inference` on a router whose route class is `AccountedRoute` (or a
subclass). Its requests are counted in `hiera_requests_received_total` as soon as the route
is entered, before query parameters, body or headers are checked, and flagged in the ASGI
scope; RequestContextMiddleware then counts exactly one `hiera_request_outcomes_total` for
each flagged request from the status it was answered with.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.errors import ErrorBody, error_body
from service.metrics import RECEIVED_SCOPE_KEY

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "hiera_inference"


def inference(endpoint: F) -> F:
    """Mark a route function as an inference endpoint, whose requests are accounted for."""
    endpoint.__dict__[_MARK] = True
    return endpoint


def is_inference(route: APIRoute) -> bool:
    """Tell whether `route` serves an `@inference` endpoint."""
    return bool(getattr(route.endpoint, _MARK, False))


class AccountedRoute(APIRoute):
    """An APIRoute that counts each request to an `@inference` endpoint received, once."""

    # The shape of this route's error bodies (protocols override it), for answers given
    # before the route runs (service.refusal_gate).
    error_body: ErrorBody = staticmethod(error_body)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not is_inference(self):
            return handler
        endpoint = self.name

        async def received(request: Request) -> Response:
            request.app.state.metrics.request_received(endpoint)
            request.scope[RECEIVED_SCOPE_KEY] = True
            return await handler(request)

        return received
