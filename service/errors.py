"""Domain errors and their HTTP answers, mapped in one place."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from service.batching import (
    BatcherClosed,
    BatcherError,
    DeadlineExceeded,
    InferenceFailed,
    QueueFull,
)
from service.engine.errors import EngineUnavailable
from service.imaging import (
    CorruptImage,
    DegenerateImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    TruncatedImage,
    UnsupportedFormat,
)
from service.logs import request_id_var
from service.responses import JSONResponse

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with a status, a stable code and a message safe to show the client."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class NotReady(ApiError):
    def __init__(self, reason: str) -> None:
        super().__init__(
            503, "not_ready", f"the model is not ready: {reason}", {"Retry-After": "5"}
        )


class ClientDisconnected(ApiError):
    """The client closed its connection before its answer was ready (nginx's 499)."""

    def __init__(self) -> None:
        super().__init__(499, "client_disconnected", "the client closed the connection")


_IMAGE_STATUS: dict[type[ImageError], int] = {
    EmptyImage: 400,
    CorruptImage: 400,
    UnsupportedFormat: 415,
    ImageTooLarge: 413,
    TruncatedImage: 400,
    DegenerateImage: 422,
}


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception to the ApiError a client sees; unknown ones become a generic 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ClientDisconnect):  # the client hung up while its body was read
        return ClientDisconnected()
    if isinstance(exc, ImageError):
        return ApiError(_IMAGE_STATUS.get(type(exc), 400), exc.code, str(exc))
    if isinstance(exc, QueueFull):
        return ApiError(429, exc.code, "the server is at capacity; retry shortly",
                        {"Retry-After": str(exc.retry_after_s)})  # fmt: skip
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, exc.code, "the request did not finish within its deadline")
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, exc.code, f"the model engine is unavailable: {exc}",
                        {"Retry-After": "1"})  # fmt: skip
    if isinstance(exc, BatcherClosed):
        return ApiError(503, exc.code, "the server is shutting down", {"Retry-After": "5"})
    if isinstance(exc, InferenceFailed | BatcherError):
        return ApiError(500, "internal_error", "inference failed; see the server log")
    return ApiError(500, "internal_error", "internal server error; see the server log")


def error_body(error: ApiError) -> dict[str, Any]:
    return {
        "error": {"code": error.code, "message": error.message, "request_id": request_id_var.get()}
    }


ErrorBody = Callable[[ApiError], Any]


def error_response(exc: BaseException, body: ErrorBody | None = None) -> JSONResponse:
    """Answer `exc` in the native error shape (or `body`'s), logging server failures in full."""
    error = to_api_error(exc)
    log_answer(error, exc)
    content = (body or error_body)(error)
    return JSONResponse(content, status_code=error.status, headers=error.headers)


def log_answer(error: ApiError, exc: BaseException) -> None:
    """Log an error answer that an operator should see: server failures in full, with their
    traceback; 503 and 504 in one line."""
    if error.status in (503, 504):
        # Expected under overload, at deadlines and while draining: one line, no traceback,
        # so a burst of them cannot drown the log.
        log.warning("request answered %d %s: %s", error.status, error.code, error.message)
    elif error.status >= 500 and not isinstance(exc, ApiError):
        log.error("request failed: %s", error.code, exc_info=exc)


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Yield the routes under `routes`, those of included routers too (FastAPI >= 0.16x keeps
    an included router whole, as one route, instead of copying its routes in)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is None:
            yield route
        else:
            yield from _leaf_routes(included.routes)


def install_handlers(app: FastAPI) -> None:
    """Route every exception through `error_response` so all errors share one JSON shape."""

    def respond(
        request: Request, exc: BaseException, body: ErrorBody | None = None
    ) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.failed(to_api_error(exc).code)
        return error_response(exc, body)

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return respond(request, exc)

    async def handle_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 405:
            return _method_not_allowed(request)
        code = {404: "not_found"}.get(exc.status_code, "http_error")
        return respond(request, ApiError(exc.status_code, code, str(exc.detail)))

    def _method_not_allowed(request: Request) -> JSONResponse:
        """Answer 405 in the shape of the protocol that owns the path, with `Allow` listing
        the methods of every route on it (Starlette's own names only the first route's)."""
        methods: set[str] = set()
        shape: ErrorBody | None = None
        for route in _leaf_routes(request.app.router.routes):
            match, _ = route.matches(request.scope)
            allowed = getattr(route, "methods", None)
            if match is not Match.NONE and allowed:
                methods |= allowed
                shape = shape or getattr(route, "error_body", None)
        allow = ", ".join(sorted(methods))
        error = ApiError(
            405, "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}; use {allow}",
            {"Allow": allow},
        )  # fmt: skip
        return respond(request, error, shape)

    async def handle_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return respond(request, ApiError(422, "invalid_request", problems))

    app.add_exception_handler(StarletteHTTPException, handle_http)
    app.add_exception_handler(RequestValidationError, handle_validation)
    # Domain errors are handled inside the middleware stack (so responses carry the request
    # id and count in metrics); anything else reaches RequestContextMiddleware's last resort.
    for domain_error in (ApiError, ImageError, BatcherError):
        app.add_exception_handler(domain_error, handle)


# When each (status, code) answer is given: the documentation's status-code table is built from
# these and from the statuses the code above and the routes actually use (a pair answered but
# missing here fails tests/docs/test_generated.py).
ERROR_CODES: dict[tuple[int, str], str] = {
    (400, "empty_image"): "the request carried no image bytes",
    (400, "corrupt_image"): "the image is in an accepted format but its data cannot be decoded "
    "(Pillow's own truncation errors included)",
    (400, "truncated_image"): "the data ends before the canvas its header declares is filled (a "
    "PNG whose zlib stream ends early, a JPEG without its end-of-image marker on the GPU decode "
    "path)",
    (400, "missing_image"): "a multipart body without the `image` (or `images`) file field",
    (400, "invalid_multipart"): "a multipart body that cannot be parsed",
    (400, "too_many_images"): "more than one `image` file sent to a single-image endpoint (use "
    "the `/batch` form)",
    (400, "invalid_request"): "KServe v2 and OpenAI routes: a request (query, path or body) that "
    "FastAPI's validation refuses",
    (400, "invalid_inference_request"): "KServe v2: malformed inference request (header, shapes, "
    "binary sizes, unknown input or output)",
    (400, "invalid_tensor"): "KServe v2: `images` pixels with the wrong dtype or shape, or with "
    "NaN or infinity",
    (400, "invalid_embeddings_request"): "`/v1/embeddings`: missing `model` or `input`, token "
    "ids, a URL, bad base64, an unsupported `encoding_format` or `dimensions`",
    (401, "unauthorized"): "API keys are configured and the request carries none of them; comes "
    "with `WWW-Authenticate: Bearer`",
    (404, "not_found"): "unknown path",
    (404, "model_not_found"): "a `/v2/models/{name}` other than the served model, or a version "
    "other than `1`",
    (405, "method_not_allowed"): "e.g. `GET /v1/classify`",
    (413, "body_too_large"): "body over `--max-body-bytes` (on `/v2/.../infer`, also once "
    "inflated)",
    (413, "image_too_large"): "pixels over `--max-image-pixels`",
    (413, "too_many_images"): "more images than `--max-images-per-request` in one request",
    (415, "unsupported_media_type"): "a body neither `image/*`, `application/octet-stream` nor "
    "multipart; on `/v2/.../infer`, a `Content-Encoding` other than gzip or deflate",
    (415, "unsupported_format"): "a format outside the allowlist (JPEG, PNG, WebP, GIF, BMP, MPO; "
    "TIFF is refused on purpose), sniffed from the bytes: the declared `Content-Type` is not "
    "trusted",
    (422, "invalid_request"): "a bad query parameter (e.g. `top_k=0`)",
    (422, "degenerate_image"): "a side of 0 pixels or an aspect ratio beyond 1:200",
    (429, "queue_full"): "admitting the request would exceed the capacity (`--max-queue-size` + "
    "instances x the batch cap), or it would only join a backlog needing more model time than "
    "`--request-timeout-s`; decided before any decode, a batch request whole; comes with "
    "`Retry-After`",
    (499, "client_disconnected"): "the client hung up before its answer was ready (nobody "
    "receives this answer; it is counted as outcome `cancelled`)",
    (500, "internal_error"): "the model call for this request's batch failed; the message is "
    "generic and the details go to the log under the request id",
    (503, "not_ready"): "loading, broken, or draining (a request that arrives after SIGTERM); "
    "comes with `Retry-After: 5`",
    (503, "shutting_down"): "an accepted request still unanswered when `--drain-timeout-s` runs "
    "out; comes with `Retry-After: 5`",
    (503, "engine_unavailable"): "with `--engine process`: the engine process died, hung or is "
    "restarting, and every request waiting on it gets this at once; comes with `Retry-After: 1`",
    (504, "deadline_exceeded"): "not finished within `--request-timeout-s`",
}
