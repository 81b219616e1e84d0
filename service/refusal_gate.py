"""Refuse inference requests at the door when the service is full or not ready.

Under overload most requests are refused, and a refusal should cost almost nothing: the
ones behind it in the event loop wait for it. Going through FastAPI (routing, dependencies,
buffering and parsing the body, raising and handling QueueFull) costs several times what
answering does, so a burst of hundreds of requests took hundreds of milliseconds to refuse.
This gate looks at the admission count before any of that and answers 429 (or 503 while
loading or draining) straight away, in the route's own error shape, counted like any other
answer.
The route still admits for real: the gate only refuses what admission would refuse now.
The body is read and dropped before answering (see `_discard_body`), not parsed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_response, to_api_error
from service.metrics import RECEIVED_SCOPE_KEY, Metrics
from service.routes.accounting import AccountedRoute, is_inference

Refusal = Callable[[], BaseException | None]


class RefusalGate:
    """Answer an inference request's refusal before routing; pass everything else through."""

    def __init__(
        self, app: ASGIApp, *, routes: Iterable[BaseRoute], refusal: Refusal, metrics: Metrics
    ) -> None:
        self.app = app
        self.refusal = refusal
        self.metrics = metrics
        self.routes = [r for r in routes if isinstance(r, AccountedRoute) and is_inference(r)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            refused = self.refusal()
            if refused is not None:
                route = self._match(scope)
                if route is not None:
                    await self._refuse(route, refused, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _match(self, scope: Scope) -> AccountedRoute | None:
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope.update(child)  # as the router would: the endpoint label reads "route"
                return route
        return None

    async def _refuse(
        self,
        route: AccountedRoute,
        refused: BaseException,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self.metrics.request_received(route.name)
        scope[RECEIVED_SCOPE_KEY] = True
        self.metrics.failures.labels(reason=to_api_error(refused).code).inc()
        await _discard_body(receive)
        await error_response(refused, route.error_body)(scope, receive, send)


async def _discard_body(receive: Receive) -> None:
    """Read the request body to its end without keeping it.

    The answer does not need it, but a server that closes a connection with request bytes
    still unread makes the kernel send RST, and the client can lose the answer with it
    (ECONNRESET). Reading costs copies only, nothing like routing and parsing; the body
    limit still applies, and a client that hangs up ends it.
    """
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
