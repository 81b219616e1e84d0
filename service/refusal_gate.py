"""Refuse inference requests at the door when the service is full or not ready.

Under overload most requests are refused, and a refusal should cost almost nothing: the ones
behind it in the event loop wait for it, and in a burst the loop shares two cores with the
admitted requests' decoding and the model. So the gate sits in front of the whole app, outside
FastAPI's and Starlette's middleware, and does by itself only what a refusal needs: it
matches the path against the inference routes, asks admission, counts the request like any
other answer (received, outcome, failure code, duration), and writes the route's own error
shape with `Retry-After` and `X-Request-ID`. In process, that took 12 us of CPU per 429
against 90 us for the same 429 from a route (`python -m bench.refusal_cost`).

It refuses only requests the stack would refuse the same way, and passes the rest through:
- everything admission would let in now (the route still admits for real, so a request that
  slips past between two looks is refused there, before any decode);
- requests without a valid API key, when keys are set (they get 401, not the load);
- requests with an `Origin` header, when CORS is on (their answers need CORS headers);
- bodies that declare no length or more than the limit (413 and chunked uploads are the
  stack's).
The body is read and dropped before answering (see `_discard_body`), not parsed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.front import Answering, FrontPolicy, read_body, replay, whole
from service.metrics import Metrics
from service.middleware import ARRIVED_SCOPE_KEY, RequestIds
from service.routes.accounting import AccountedRoute, is_inference

Refusal = Callable[[], BaseException | None]


class RefusalGate:
    """Answer an inference request's refusal in front of the app; pass everything else on."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Iterable[BaseRoute],
        refusal: Refusal,
        metrics: Metrics,
        ids: RequestIds,
        policy: FrontPolicy,
    ) -> None:
        self.app = app
        self.refusal = refusal
        self.metrics = metrics
        self.ids = ids
        self.policy = policy
        inference = [r for r in routes if isinstance(r, AccountedRoute) and is_inference(r)]
        # Most inference paths are fixed: one dict lookup. Templated ones (KServe's model
        # name) are matched by their pattern, as the router would.
        self.fixed = {r.path: r for r in inference if not r.param_convertors}
        self.templated = [r for r in inference if r.param_convertors]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self._route(scope["path"])
            if route is not None:
                head = self.policy.ordinary_head(scope)
                if head is not None:
                    await self._door(route, head.request_id, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _door(
        self,
        route: AccountedRoute,
        request_id: bytes | None,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Look at admission before the body and again once it has all arrived; refuse, or
        pass the request on with its body.

        The second look is what makes the door hold in a burst: uvicorn starts hundreds of
        requests as soon as their headers arrive, before any body is whole, so a look then
        passed them all, and the route then refused dozens the expensive way. With the body
        in hand, nothing between this look and the route's admission waits on the event
        loop, so no other request can take the room in between. The route still admits for
        real. A client that hangs up mid-body is passed on, so that the app accounts for it as
        for any disconnect.
        """
        # Every answer's duration counts from here, the body's arrival included.
        arrived = scope[ARRIVED_SCOPE_KEY] = time.perf_counter()
        refused = self.refusal()
        if refused is not None:
            await _discard_body(receive)
            await self._refuse(route, refused, request_id, arrived, send)
            return
        messages = await read_body(receive)
        if whole(messages):  # no disconnect
            refused = self.refusal()
            if refused is not None:
                await self._refuse(route, refused, request_id, arrived, send)
                return
        await self.app(scope, replay(messages, receive), send)

    def _route(self, path: str) -> AccountedRoute | None:
        route = self.fixed.get(path)
        if route is None:
            route = next((r for r in self.templated if r.path_regex.match(path)), None)
        return route

    async def _refuse(
        self,
        route: AccountedRoute,
        refused: BaseException,
        incoming_id: bytes | None,
        arrived: float,
        send: Send,
    ) -> None:
        """Answer `refused` in the route's error shape, counted as the stack would count it."""
        with Answering(self.metrics, route.name, self.ids.of(incoming_id), arrived) as answer:
            await answer.error(send, refused, route.error_body)


async def _discard_body(receive: Receive) -> None:
    """Read the request body to its end without keeping it.

    The answer does not need it, but a server that closes a connection with request bytes
    still unread makes the kernel send RST, and the client can lose the answer with it
    (ECONNRESET). Reading costs copies only, nothing like routing and parsing; the declared
    length was checked against the body limit, and a client that hangs up ends it.
    """
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
