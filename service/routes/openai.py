"""OpenAI-compatible `POST /v1/embeddings` for images, so retrieval stacks plug in unchanged."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request

from service.admission import Ticket
from service.disconnect import until_disconnect
from service.engine.state import Want
from service.errors import ApiError, to_api_error
from service.imaging import ImageError
from service.inference import InferenceService, Outcome
from service.postprocess import encode_base64, normalize
from service.responses import JSONResponse
from service.routes.accounting import inference
from service.routes.protocol import protocol_route
from service.routes.slices import predict_in_slices, window_of
from service.schemas import protocol_error_responses

ENDPOINT = "openai_embeddings"


class ParamError(ApiError):
    """A 400 that names the offending request field, as OpenAI's `param` does."""

    def __init__(
        self, param: str | None, message: str, status: int = 400,
        code: str = "invalid_embeddings_request",
    ) -> None:  # fmt: skip
        super().__init__(status, code, message)
        self.param = param


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def _error_body(error: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": _error_type(error.status),
            "param": getattr(error, "param", None),
            "code": error.code,
        }
    }


_ERRORS = protocol_error_responses(
    {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
            }
        },
    }
)
router = APIRouter(
    prefix="/v1", tags=["openai"], route_class=protocol_route(_error_body), responses=_ERRORS
)


_WANT = Want(embedding=True)


def get_service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


ServiceDep = Annotated[InferenceService, Depends(get_service)]

_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "description": "echoed back; any name is accepted"},
        "input": {
            "description": "images: data URIs (data:image/jpeg;base64,...) or bare base64, as "
            "one string or a list; also {'type': 'image_url', 'image_url': {'url': ...}} or "
            "{'image': ...} objects",
            "anyOf": [{"type": "string"}, {"type": "array"}],
        },
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
        "dimensions": {"type": "integer", "description": "null or the model's embedding width"},
    },
}


@router.post(
    "/embeddings",
    summary="OpenAI-compatible image embeddings (unit L2 norm)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _REQUEST_SCHEMA}},
        }
    },
)
@inference
async def openai_embeddings(request: Request, service: ServiceDep) -> JSONResponse:
    deadline = time.monotonic() + service.settings.request_timeout_s
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ParamError(None, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ParamError(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ParamError("model", "'model' is required and must be a string")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ParamError("encoding_format", f"encoding_format must be 'float' or 'base64', "
                         f"got {encoding!r}")  # fmt: skip
    dimensions, card = body.get("dimensions"), service.card
    if dimensions is not None and card is not None and dimensions != card.embed_dim:
        raise ParamError(
            "dimensions",
            f"dimensions must be null or {card.embed_dim}: Hiera embeddings are not trained "
            "to be truncated (not Matryoshka), so a shorter vector would be meaningless",
        )
    images = parse_inputs(body.get("input"), service.settings.max_embedding_inputs)

    def predict(index: int, deadline: float, ticket: Ticket) -> Coroutine[Any, Any, Outcome]:
        return _predict(service, images[index], index, deadline, ticket)

    # Up to a window of images admitted or refused (429) whole, before any decode; a larger
    # request is fed in slices as its images are answered (service.routes.slices).
    outcomes = await until_disconnect(
        request.receive,
        predict_in_slices(service, len(images), predict, window_of(service), deadline),
    )
    started = time.perf_counter()
    data = []
    for index, outcome in enumerate(outcomes):
        vector = normalize(outcome.result.embedding)
        payload: Any = encode_base64(vector) if encoding == "base64" else vector
        data.append({"object": "embedding", "index": index, "embedding": payload})
    service.metrics.stage_duration.labels(ENDPOINT, "postprocess").observe(
        time.perf_counter() - started
    )
    # Images are not text tokens; usage reports zero rather than inventing a count.
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    return JSONResponse({"object": "list", "model": model, "data": data, "usage": usage})


async def _predict(
    service: InferenceService, data: bytes, index: int, deadline: float, ticket: Ticket
) -> Outcome:
    try:
        return await service.predict(data, ENDPOINT, deadline, ticket=ticket, want=_WANT)
    except ImageError as exc:  # say which input was bad; the status stays errors.py's
        error = to_api_error(exc)
        raise ParamError(f"input[{index}]", f"input[{index}]: {error.message}", error.status,
                         error.code) from exc  # fmt: skip


def parse_inputs(value: Any, max_images: int) -> list[bytes]:
    """Return the encoded images in `input`, or a ParamError that says how to send them."""
    items = value if isinstance(value, list) else [value]
    if value is None or not items:
        raise ParamError("input", "'input' must be an image (data URI or base64) or a list of them")
    if all(isinstance(i, int) and not isinstance(i, bool) for i in items) or all(
        isinstance(i, list) for i in items
    ):
        raise ParamError(
            "input",
            "'input' holds token ids, but this model embeds images: send data URIs or base64 "
            "strings (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))",
        )
    if len(items) > max_images:
        raise ApiError(
            413, "too_many_images", f"{len(items)} images exceed the limit of {max_images}"
        )
    return [_image_bytes(item, f"input[{i}]" if isinstance(value, list) else "input")
            for i, item in enumerate(items)]  # fmt: skip


def _image_bytes(item: Any, param: str) -> bytes:
    if isinstance(item, dict):
        if item.get("type") == "image_url" or "image_url" in item:
            url = item.get("image_url")
            item = url.get("url") if isinstance(url, dict) else url
            param += ".image_url.url"
        elif "image" in item:
            item = item["image"]
            param += ".image"
    if not isinstance(item, str):
        raise ParamError(
            param, f"{param} must be a data URI or base64 string, got {type(item).__name__}"
        )
    text = item.strip()
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        raise ParamError(
            param,
            f"{param} is a URL; remote images are never fetched by the server (that would let "
            "callers make it request arbitrary addresses). Download the image and send its "
            "bytes as a data URI: data:image/jpeg;base64,<base64 of the file>",
        )
    if lowered.startswith("data:"):
        meta, comma, text = text.partition(",")
        if not comma or not meta.lower().endswith(";base64"):
            raise ParamError(
                param, f"{param} must be a base64 data URI (data:image/...;base64,...)"
            )
    elif ":" in lowered:
        raise ParamError(
            param, f"{param} must be a data URI or bare base64, not a {lowered.split(':')[0]}: URI"
        )
    try:
        # Line breaks (as `base64` wraps its output) are not part of the data.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ParamError(param, f"{param} is not valid base64") from None
