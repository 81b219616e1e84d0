"""The direct lane: `/v1/classify` and `/v1/embed` with a raw image body, answered in front of
FastAPI.

Almost every single-image request is the same plain one: a JPEG body, a declared length and at
most a parameter or two. For it, FastAPI's middleware stack, routing and parameter solving are
pure cost on the event loop, and at light load every microsecond of it adds to the answer's
latency: at one client, the lane took the loop's CPU per request from 1.56 to 1.28 ms and the
p50 down by 0.40 ms (CHANGELOG.md, 0.1.0). The lane answers exactly those requests, with
the routes' own code (`native.answer_one`, the same renderers and checks), and passes
everything else to the stack unchanged, which answers it as it always did:
- multipart bodies and any media type that is not an image's (415 comes from the stack);
- a query string the lane cannot read without doubt: an unknown or repeated parameter, or a
  value FastAPI would parse or refuse in its own way (`top_k=0`, `normalize=yes`, `%`-escapes);
- whatever `FrontPolicy.ordinary` leaves to the stack (CORS, missing keys, chunked or
  oversized bodies), and a client that hangs up while sending the body.
The answer is the stack's, byte for byte but for the timings: status, JSON body, error shape,
`X-Request-ID`, `Retry-After`, and the same counts in /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import error_body
from service.front import Answering, FrontPolicy, body_of, read_body, replay, whole
from service.inference import InferenceService
from service.metrics import Metrics
from service.middleware import ARRIVED_SCOPE_KEY, RequestIds
from service.responses import render_json
from service.routes import native
from service.uploads import is_raw_image, media_type

# A query parameter's reader: the value from its raw bytes, or None to leave it to FastAPI.
Reader = Callable[[bytes], Any]
# A route's renderer, made from its query parameters; may raise the route's own ApiError.
MakeRender = Callable[[InferenceService, dict[str, Any]], native.Render]


def _top_k(raw: bytes) -> int | None:
    # Digits only (no sign, no spaces) and not so long that int() could refuse; 0 is FastAPI's.
    if raw.isdigit() and len(raw) <= 9 and int(raw) >= 1:
        return int(raw)
    return None


_BOOLEANS = {b"true": True, b"false": False}  # FastAPI's other spellings go to FastAPI
_ENCODINGS = {b"float": "float", b"base64": "base64"}


def _classify(service: InferenceService, query: dict[str, Any]) -> native.Render:
    k = native.check_top_k(service, query.get("top_k", native.DEFAULT_TOP_K))
    return native.classification(service, k)


def _embed(service: InferenceService, query: dict[str, Any]) -> native.Render:
    return native.embedding(
        query.get("normalize", native.DEFAULT_NORMALIZE),
        query.get("encoding", native.DEFAULT_ENCODING),
    )


class _Route:
    def __init__(self, name: str, readers: dict[str, Reader], make: MakeRender) -> None:
        self.name = name
        self.readers = readers
        self.make = make

    def query(self, raw: bytes) -> dict[str, Any] | None:
        """Read the query string, or return None if any part of it is not plainly ours."""
        values: dict[str, Any] = {}
        if not raw:
            return values
        for part in raw.split(b"&"):
            name, sep, value = part.partition(b"=")
            key = name.decode("latin-1")
            reader = self.readers.get(key)
            if reader is None or not sep or key in values:
                return None
            values[key] = reader(value)
            if values[key] is None:
                return None
        return values


ROUTES = {
    "/v1/classify": _Route("classify", {"top_k": _top_k}, _classify),
    "/v1/embed": _Route("embed", {"normalize": _BOOLEANS.get, "encoding": _ENCODINGS.get}, _embed),
}


class DirectLane:
    """Answer plain single-image requests to the native routes; pass the rest to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: InferenceService,
        metrics: Metrics,
        ids: RequestIds,
        policy: FrontPolicy,
    ) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics
        self.ids = ids
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = ROUTES.get(scope["path"])
            if route is not None:
                head = self.policy.ordinary_head(scope)
                query = route.query(scope["query_string"])
                if (
                    head is not None
                    and query is not None
                    and is_raw_image(media_type((head.content_type or b"").decode("latin-1")))
                ):
                    await self._direct(route, query, head.request_id, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _direct(
        self,
        route: _Route,
        query: dict[str, Any],
        request_id: bytes | None,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        arrived = scope.get(ARRIVED_SCOPE_KEY) or time.perf_counter()
        messages = await read_body(receive)
        if not whole(messages):  # hung up mid-body: the stack accounts for it as it always has
            await self.app(scope, replay(messages, receive), send)
            return
        service = self.service
        with Answering(self.metrics, route.name, self.ids.of(request_id), arrived) as answer:
            try:
                deadline = native.deadline_for(service)
                render = route.make(service, query)
                content = await native.answer_one(
                    service, route.name, body_of(messages), render, receive, deadline
                )
            except Exception as exc:
                await answer.error(send, exc, error_body)
                return
            await answer.json(send, 200, render_json(content))
