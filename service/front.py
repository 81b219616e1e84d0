"""What the layers in front of FastAPI share: the refusal gate and the direct lane.

Both look at a request before FastAPI's stack does, and answer some of them themselves, so
each answer must be what the stack would have given: the same JSON shape, `X-Request-ID`, the
same counts (received, outcome, failure code, duration from arrival). Both take only ordinary
requests (`FrontPolicy.ordinary`) and pass the rest on, for the stack to answer as it always
did: CORS requests, callers without a valid key, bodies of no declared length or over the
limit.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

from starlette.types import Message, Receive, Scope, Send

from service.auth import KeyRing
from service.errors import ErrorBody, log_answer, to_api_error
from service.logs import request_id_var
from service.metrics import Metrics
from service.middleware import REQUEST_ID_HEADER
from service.responses import render_json

# Where FrontPolicy.ordinary_head keeps its verdict on a request: (the policy, the head or None).
_VERDICT_SCOPE_KEY = "hiera.ordinary"


@dataclass(frozen=True, slots=True)
class Head:
    """The request headers the front layers read (raw bytes, None when absent)."""

    content_length: bytes | None
    content_type: bytes | None
    origin: bytes | None
    request_id: bytes | None


def read_head(scope: Scope) -> Head:
    """Pick the headers that matter here out of the scope in one pass (the first of each)."""
    length = content_type = origin = request_id = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = length or value
        elif name == b"content-type":
            content_type = content_type or value
        elif name == b"origin":
            origin = origin or value
        elif name == REQUEST_ID_HEADER:
            request_id = request_id or value
    return Head(length, content_type, origin, request_id)


@dataclass(frozen=True)
class FrontPolicy:
    """Which requests a front layer may answer itself."""

    max_body_bytes: int
    keys: KeyRing | None = None
    cors: bool = False

    def ordinary(self, head: Head, scope: Scope) -> bool:
        """Tell whether the stack would treat this request as the front layers do: a body of
        declared length within the limit, no CORS to answer, and a valid key if keys are set.
        """
        length = head.content_length
        return (
            length is not None
            and length.isdigit()
            and int(length) <= self.max_body_bytes
            and not (head.origin is not None and self.cors)
            and (self.keys is None or self.keys.admits(scope))
        )

    def ordinary_head(self, scope: Scope) -> Head | None:
        """Return the request's head if it is ordinary (`ordinary`), else None.

        Worked out once per request and kept in the scope: the gate and then the lane both
        ask, and the second gets the first answer instead of reading the headers and
        comparing the key again.
        """
        seen = scope.get(_VERDICT_SCOPE_KEY)
        if seen is not None and seen[0] is self:
            verdict: Head | None = seen[1]
            return verdict
        head = read_head(scope)
        verdict = head if self.ordinary(head, scope) else None
        scope[_VERDICT_SCOPE_KEY] = (self, verdict)
        return verdict


async def read_body(receive: Receive) -> list[Message]:
    """Receive the request body's messages, up to the last one or a disconnect."""
    messages = [await receive()]
    while messages[-1]["type"] == "http.request" and messages[-1].get("more_body", False):
        messages.append(await receive())
    return messages


def whole(messages: list[Message]) -> bool:
    """Tell whether `read_body` got the whole body (the client did not hang up mid-way)."""
    return bool(messages[-1]["type"] == "http.request")


def body_of(messages: list[Message]) -> bytes:
    """Join the body of `read_body`'s messages."""
    if len(messages) == 1:
        return bytes(messages[0].get("body", b""))
    return b"".join(m.get("body", b"") for m in messages)


def replay(messages: list[Message], receive: Receive) -> Receive:
    """Return a `receive` that gives the body read (in one message, if it came whole), then
    listens on for the disconnect as `receive` does."""
    if len(messages) > 1 and whole(messages):
        messages = [{"type": "http.request", "body": body_of(messages), "more_body": False}]
    pending = collections.deque(messages)

    async def replayed() -> Message:
        return pending.popleft() if pending else await receive()

    return replayed


async def send_json(
    send: Send, status: int, body: bytes, request_id: str, headers: Mapping[str, str]
) -> None:
    """Write a whole JSON answer, as the stack's JSONResponse and request-id middleware do."""
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        (REQUEST_ID_HEADER, request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Answering:
    """One inference request answered in front of the stack, counted as the stack counts it.

    Entered: the request id is set for logs and error bodies, and the request is counted in
    flight and received. Left: its outcome (`status`, 500 if nothing was answered) and its
    duration from `arrived` are counted. `error` answers an exception in the route's shape.
    """

    __slots__ = ("_token", "arrived", "endpoint", "metrics", "request_id", "status")

    def __init__(self, metrics: Metrics, endpoint: str, request_id: str, arrived: float) -> None:
        self.metrics = metrics
        self.endpoint = endpoint
        self.request_id = request_id
        self.arrived = arrived
        self.status = 500

    def __enter__(self) -> Answering:
        self._token = request_id_var.set(self.request_id)
        self.metrics.in_flight.inc()
        self.metrics.request_received(self.endpoint)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        metrics = self.metrics
        metrics.in_flight.dec()
        elapsed = time.perf_counter() - self.arrived
        metrics.request_done(self.endpoint, self.status, elapsed, received=True)
        request_id_var.reset(self._token)

    async def json(
        self, send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Write the answer `body` with `status`."""
        self.status = status
        await send_json(send, status, body, self.request_id, headers or {})

    async def error(self, send: Send, exc: BaseException, body: ErrorBody) -> None:
        """Answer `exc` as the stack's handlers would: mapped, counted, logged, in `body`'s
        shape, with the error's headers (Retry-After)."""
        error = to_api_error(exc)
        self.metrics.failed(error.code)
        log_answer(error, exc)
        await self.json(send, error.status, render_json(body(error)), error.headers)
