"""KServe v2 / Open Inference Protocol (REST), so tritonclient and KServe tooling work unchanged."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

from service.admission import Ticket
from service.card import ModelCard
from service.disconnect import until_disconnect
from service.engine.state import Want
from service.errors import ApiError, NotReady, to_api_error
from service.imaging import ImageError
from service.inference import InferenceService, Outcome
from service.postprocess import Prediction, top_k
from service.responses import JSONResponse
from service.routes import kserve_codec as codec
from service.routes.accounting import inference
from service.routes.protocol import all_or_nothing, protocol_route
from service.schemas import protocol_error_responses

SERVER_NAME = "hiera-serve"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
# Triton's platform names, so tooling that switches on them recognises the artifact kind.
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "eager": "pytorch"}


def _error_body(error: ApiError) -> dict[str, Any]:
    return {"error": error.message}


# Errors are {"error": "..."}; readiness answers 503 with {"ready": false}: both are objects.
_ERRORS = protocol_error_responses(
    {"type": "object", "properties": {"error": {"type": "string"}, "ready": {"type": "boolean"}}}
)
router = APIRouter(
    prefix="/v2",
    tags=["kserve v2"],
    route_class=protocol_route(_error_body),
    responses=_ERRORS,
)


def get_service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


ServiceDep = Annotated[InferenceService, Depends(get_service)]


@router.get("", summary="Server metadata: name, version, protocol extensions")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


@router.get("/health/live", summary="200 while the process runs")
async def server_live() -> JSONResponse:
    return JSONResponse({"live": True})


@router.get("/health/ready", summary="200 once the model is loaded and warmed; 503 otherwise")
async def server_ready(service: ServiceDep) -> JSONResponse:
    return _readiness({"ready": service.ready}, service)


@router.get("/models/{name}", summary="Model metadata: platform, inputs and outputs")
@router.get("/models/{name}/versions/{version}", summary="Model metadata for one version")
async def model_metadata(
    name: str, service: ServiceDep, version: str = MODEL_VERSION
) -> JSONResponse:
    return JSONResponse(metadata(service, _card(service, name, version)))


def metadata(service: InferenceService, card: ModelCard) -> dict[str, Any]:
    """Return the model metadata answer (REST and gRPC)."""
    height, width = card.preprocessing.input_size
    return {
        "name": card.name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORMS[service.backend_name],
        "inputs": [
            {"name": codec.BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": codec.PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, height, width]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, card.num_classes]},
            {"name": "embedding", "datatype": "FP32", "shape": [-1, card.embed_dim]},
        ],
    }


@router.get("/models/{name}/ready", summary="200 when this model is ready")
@router.get("/models/{name}/versions/{version}/ready", summary="200 when this version is ready")
async def model_ready(name: str, service: ServiceDep, version: str = MODEL_VERSION) -> JSONResponse:
    card = _card(service, name, version)
    return _readiness({"name": card.name, "ready": service.ready}, service)


@router.post(
    "/models/{name}/infer",
    summary="Run inference on encoded images or pixels",
    openapi_extra=codec.REQUEST_BODY,
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Run inference on one version",
    openapi_extra=codec.REQUEST_BODY,
)
@inference
async def kserve_infer(
    name: str, request: Request, service: ServiceDep, version: str = MODEL_VERSION
) -> Response:
    deadline = time.monotonic() + service.settings.request_timeout_s
    card = _card(service, name, version)
    # tritonclient sends no Content-Type: read the raw body whatever it is declared as.
    body = await request.body()
    encoding = request.headers.get("content-encoding")
    if encoding:
        limit = service.settings.max_body_bytes
        body = await asyncio.to_thread(codec.decompress, body, encoding, limit)
    parsed = codec.parse_request(body, request.headers.get(codec.HEADER_LENGTH))
    _check_classification(service, parsed.outputs)
    want = wanted(card, parsed.outputs)
    if parsed.images is not None:
        _check_count(service, len(parsed.images))
        # Admitted or refused (429) whole, before any image is decoded.
        ticket = service.admit(len(parsed.images))
        work = [
            _predict(service, data, index, deadline, ticket, want)
            for index, data in enumerate(parsed.images)
        ]
        try:
            outcomes = await until_disconnect(request.receive, all_or_nothing(work))
        finally:
            ticket.release_all()
    else:
        assert parsed.pixels is not None
        _check_count(service, parsed.pixels.shape[0] if parsed.pixels.ndim else 0)
        outcomes = await until_disconnect(
            request.receive, service.predict_pixels(parsed.pixels, "kserve_infer", deadline, want)
        )
    started = time.perf_counter()
    outputs = [_output(card, service, spec, outcomes) for spec in parsed.outputs]
    head: dict[str, Any] = {"model_name": card.name, "model_version": MODEL_VERSION}
    if parsed.id is not None:
        head["id"] = parsed.id
    content, header_length = codec.encode_response(head, outputs)
    service.metrics.stage_duration.labels("kserve_infer", "postprocess").observe(
        time.perf_counter() - started
    )
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


def wanted(card: ModelCard, outputs: list[codec.RequestedOutput]) -> Want:
    """Return what the engine must send back for these requested outputs."""
    k = max((min(o.classification, card.num_classes) for o in outputs), default=0)
    raw = {o.name for o in outputs if not o.classification}
    return Want(top_k=k, embedding="embedding" in raw, logits="logits" in raw)


async def _predict(
    service: InferenceService,
    data: bytes,
    index: int,
    deadline: float,
    ticket: Ticket,
    want: Want,
    endpoint: str = "kserve_infer",
) -> Outcome:
    try:
        return await service.predict(data, endpoint, deadline, ticket=ticket, want=want)
    except ImageError as exc:  # say which element was bad; the status stays errors.py's
        error = to_api_error(exc)
        message = f"{codec.BYTES_INPUT}[{index}]: {error.message}"
        raise ApiError(error.status, error.code, message) from exc


def _card(service: InferenceService, name: str, version: str) -> ModelCard:
    card = service.card
    if card is None:
        raise NotReady(service.reason)
    if name != card.name or version != MODEL_VERSION:
        what = f"model '{name}'" + ("" if version == MODEL_VERSION else f" version '{version}'")
        raise ApiError(
            404, "model_not_found",
            f"{what} is not served here; this server serves '{card.name}' version "
            f"'{MODEL_VERSION}'",
        )  # fmt: skip
    return card


def _readiness(body: dict[str, Any], service: InferenceService) -> JSONResponse:
    if service.ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


def _check_count(service: InferenceService, count: int) -> None:
    limit = service.settings.max_images_per_request
    if count > limit:
        raise ApiError(413, "too_many_images", f"{count} images exceed the limit of {limit}")
    if count < 1:
        raise codec.bad_request("the input holds no images")


def _check_classification(service: InferenceService, outputs: list[codec.RequestedOutput]) -> None:
    limit = service.settings.max_top_k
    for spec in outputs:
        if spec.classification > limit:
            raise codec.bad_request(f"classification must be <= {limit}, got {spec.classification}")


def predictions(outcome: Outcome, card: ModelCard, k: int) -> list[Prediction]:
    """Return one outcome's k best classes (ranked by the engine when it sent only those)."""
    result = outcome.result
    if result.outputs is not None:
        return result.outputs.top_k(result.row, card.labels, k)
    return top_k(result.logits, card.labels, k)


def _output(
    card: ModelCard, service: InferenceService, spec: codec.RequestedOutput, outcomes: list[Outcome]
) -> codec.OutputTensor:
    batch = len(outcomes)
    if spec.classification:
        k = min(spec.classification, card.num_classes)
        elements = [
            f"{p.score}:{p.index}:{p.label}".encode()
            for o in outcomes
            for p in predictions(o, card, k)
        ]
        return codec.OutputTensor(spec.name, "BYTES", [batch, k], elements, spec.binary)
    rows = [getattr(o.result, spec.name) for o in outcomes]
    values = np.stack(rows).astype(np.float32)
    return codec.OutputTensor(spec.name, "FP32", list(values.shape), values, spec.binary)
