"""What the non-native protocols share: their own error shapes, and all-or-nothing fan-out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError

from service.errors import ApiError, ErrorBody, error_response, to_api_error
from service.routes.accounting import AccountedRoute

T = TypeVar("T")


def protocol_route(body: ErrorBody) -> type[AccountedRoute]:
    """Return a route class whose errors keep the status table of errors.py but `body`'s shape.

    Domain errors raised anywhere in the handler (the body-size limit included, which fires
    while the body is read) are caught here, so a KServe or OpenAI client never sees the
    native `{"error": {"code", ...}}` shape.
    """

    class ProtocolRoute(AccountedRoute):
        error_body = staticmethod(body)

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    problems = "; ".join(
                        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
                    )
                    return _respond(request, ApiError(400, "invalid_request", problems), body)
                except Exception as exc:
                    return _respond(request, exc, body)

            return guarded

    return ProtocolRoute


def _respond(request: Request, exc: Exception, body: ErrorBody) -> Response:
    request.app.state.metrics.failed(to_api_error(exc).code)
    return error_response(exc, body)


async def all_or_nothing(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently, results in order; the first failure cancels the rest and is raised."""
    # Cancelling matters: one bad image must not keep its siblings queued for model time.
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        first = failed.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [task.result() for task in tasks]
