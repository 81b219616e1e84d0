"""Response models: they document the API in /docs; handlers return orjson responses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Timing(BaseModel):
    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    postprocess_ms: float
    batch_size: int = Field(description="images in the model batch this one ran in")


class LabelScore(BaseModel):
    index: int = Field(description="class index in the model's output")
    label: str
    score: float = Field(description="softmax probability")


class ClassifyResponse(BaseModel):
    model: str
    labels: list[LabelScore]
    timing: Timing


class EmbedResponse(BaseModel):
    model: str
    embedding: list[float] | str = Field(
        description="floats, or base64 of little-endian float32 with encoding=base64"
    )
    dim: int
    normalized: bool
    encoding: str
    timing: Timing


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchItem(BaseModel):
    index: int = Field(description="position of the image in the request")
    result: dict[str, Any] | None = Field(None, description="as the single-image response")
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    model: str
    results: list[BatchItem]


def image_body(field: str, *, batch: bool) -> dict[str, Any]:
    """OpenAPI requestBody for endpoints that read raw image bytes or multipart files."""
    binary = {"type": "string", "format": "binary"}
    multipart = {
        "schema": {
            "type": "object",
            "properties": {field: {"type": "array", "items": binary} if batch else binary},
            "required": [field],
        }
    }
    content: dict[str, Any] = {"multipart/form-data": multipart}
    if not batch:
        content = {
            f"image/{kind}": {"schema": binary} for kind in ("jpeg", "png", "webp")
        } | content
    return {"requestBody": {"required": True, "content": content}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "empty, corrupt or malformed input",
        413: "body or image too large",
        415: "unsupported content type or image format",
        422: "invalid query parameter",
        429: "queue full; retry after Retry-After seconds",
        503: "not ready or shutting down",
        504: "deadline exceeded",
    }.items()
}


_PROTOCOL_STATUSES = {
    400: "malformed request or input",
    401: "missing or wrong API key",
    404: "unknown model or version",
    413: "body, image or image count too large",
    415: "unsupported content type, encoding or image format",
    422: "invalid parameter or degenerate image",
    429: "at capacity; retry after Retry-After seconds",
    499: "the client closed the connection",
    500: "internal error (details in the server log)",
    503: "not ready or shutting down",
    504: "deadline exceeded",
}


def protocol_error_responses(error_schema: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """Document every error status of a protocol router, in that protocol's error shape."""
    content = {"application/json": {"schema": error_schema}}
    return {
        status: {"description": description, "content": content}
        for status, description in _PROTOCOL_STATUSES.items()
    }
