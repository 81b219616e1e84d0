"""The native API: /v1/classify, /v1/embed, their batch forms, and /v1/models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.types import Receive

from service.disconnect import until_disconnect
from service.engine.state import Want
from service.errors import ApiError, error_body, to_api_error
from service.inference import InferenceService, Outcome
from service.postprocess import encode_base64, normalize, top_k
from service.responses import JSONResponse
from service.routes.accounting import AccountedRoute, inference
from service.schemas import (
    ERROR_RESPONSES,
    BatchResponse,
    ClassifyResponse,
    EmbedResponse,
    image_body,
)
from service.uploads import BATCH_FIELD, SINGLE_FIELD, read_images

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["inference"], route_class=AccountedRoute)


async def get_service(request: Request) -> InferenceService:
    # async: FastAPI runs a plain `def` dependency on a worker thread, for every request.
    return _service(request)


def _service(request: Request) -> InferenceService:
    # The inference routes read it directly: a dependency costs ~10% of their event-loop time.
    service: InferenceService = request.app.state.service
    return service


ServiceDep = Annotated[InferenceService, Depends(get_service)]
TopK = Annotated[int, Query(ge=1, description="number of classes to return")]
Normalize = Annotated[bool, Query(description="scale the embedding to unit L2 norm")]
Encoding = Annotated[Literal["float", "base64"], Query(description="float list or base64 f32le")]


@dataclass(frozen=True)
class Render:
    """How one image's answer is rendered, and what it needs back from the engine."""

    fields: Callable[[Outcome], dict[str, Any]]
    want: Want

    def __call__(self, outcome: Outcome) -> dict[str, Any]:
        return self.fields(outcome)


# The query parameters' defaults (the direct lane reads them too: service.routes.direct).
DEFAULT_TOP_K = 5
DEFAULT_NORMALIZE = True
DEFAULT_ENCODING: Literal["float", "base64"] = "float"


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(SINGLE_FIELD, batch=False),
    summary="Top-k ImageNet classes for one image",
)
@inference
async def classify(request: Request, top_k: TopK = DEFAULT_TOP_K) -> JSONResponse:
    service = _service(request)
    k = check_top_k(service, top_k)
    render = classification(service, k)
    return await _single(request, service, "classify", render)


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(BATCH_FIELD, batch=True),
    summary="Top-k classes for several images; each answered independently",
)
@inference
async def classify_batch(request: Request, top_k: TopK = DEFAULT_TOP_K) -> JSONResponse:
    service = _service(request)
    k = check_top_k(service, top_k)
    return await _batch(request, service, "classify_batch", classification(service, k))


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(SINGLE_FIELD, batch=False),
    summary="Pooled Hiera embedding for one image",
)
@inference
async def embed(
    request: Request,
    normalize: Normalize = DEFAULT_NORMALIZE,
    encoding: Encoding = DEFAULT_ENCODING,
) -> JSONResponse:
    return await _single(request, _service(request), "embed", embedding(normalize, encoding))


@router.post(
    "/embed/batch",
    response_model=BatchResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=image_body(BATCH_FIELD, batch=True),
    summary="Embeddings for several images; each answered independently",
)
@inference
async def embed_batch(
    request: Request,
    normalize: Normalize = DEFAULT_NORMALIZE,
    encoding: Encoding = DEFAULT_ENCODING,
) -> JSONResponse:
    return await _batch(request, _service(request), "embed_batch", embedding(normalize, encoding))


@router.get("/models", summary="The served model, runtime and batching settings")
async def models(service: ServiceDep) -> JSONResponse:
    settings, card = service.settings, service.card
    info = service.engine_info()
    entry: dict[str, Any] = {
        "ready": service.ready,
        "state": service.state,
        "engine": "process" if settings.engine_socket is not None else "inline",
        "backend": service.backend_name,
        "devices": service.devices,
        "providers": service.providers,
        "decode_device": service.decode_device,
        "device_decoder": service.device_decoder,
        "precision": settings.precision,
        # Whether every instance replays CUDA graphs / ranks and normalises on its GPU.
        "cuda_graphs": bool(info.get("cuda_graphs")),
        "device_postprocess": bool(info.get("device_postprocess")),
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "batch_cap": service.batch_cap,
            "ms_per_image_by_batch_size": info.get("ms_per_image_by_batch_size", {}),
            "max_delay_ms": settings.max_delay_ms,
            "max_queue_size": settings.max_queue_size,
            "instances": len(service.devices),
            # Batches that run at once; with the adaptive CPU layout, plus one instance on
            # every core that runs a request arriving alone (never beside the others).
            "concurrent_batches": info.get("instances"),
            "solo_instance": bool(info.get("solo_instance")),
            # Images admitted at once (decoding, queued, running); past it: 429.
            "capacity": service.admission.capacity if service.admission else None,
            "request_timeout_s": settings.request_timeout_s,
        },
    }
    if card is not None:
        entry |= {
            "name": card.name,
            "variant": card.variant,
            "input_size": list(card.preprocessing.input_size),
            "embed_dim": card.embed_dim,
            "num_classes": card.num_classes,
            "preprocessing": {
                "interpolation": card.preprocessing.interpolation,
                "crop_pct": card.preprocessing.crop_pct,
                "mean": card.preprocessing.mean,
                "std": card.preprocessing.std,
            },
            "weights": {
                "source": card.weights_source,
                "kind": card.weights_kind,
                "random": card.random_weights,
                "sha256": card.weights_sha256,
                "license": card.weights_license,
            },
            "repository": card.repository,
            "artifact": card.artifact,
            "agreement": card.agreement,
        }
    return JSONResponse({"models": [entry]})


def check_top_k(service: InferenceService, k: int) -> int:
    limit = service.settings.max_top_k
    if k > limit:
        raise ApiError(422, "invalid_request", f"top_k must be <= {limit}, got {k}")
    return k


def classification(service: InferenceService, k: int) -> Render:
    def render(outcome: Outcome) -> dict[str, Any]:
        assert service.card is not None  # predict() only returns once the model is loaded
        result = outcome.result
        if result.outputs is not None:  # postprocessed once for the whole batch
            predictions = result.outputs.top_k(result.row, service.card.labels, k)
        else:
            predictions = top_k(result.logits, service.card.labels, k)
        return {"labels": [{"index": p.index, "label": p.label, "score": p.score}
                           for p in predictions]}  # fmt: skip

    return Render(render, Want(top_k=k))


def embedding(unit: bool, encoding: str) -> Render:
    def render(outcome: Outcome) -> dict[str, Any]:
        result = outcome.result
        vector = result.embedding
        if unit:
            outputs = result.outputs
            vector = outputs.unit[result.row] if outputs is not None else normalize(vector)
        payload: Any = encode_base64(vector) if encoding == "base64" else vector
        return {
            "embedding": payload,
            "dim": int(vector.shape[0]),
            "normalized": unit,
            "encoding": encoding,
        }

    return Render(render, Want(embedding=True))


def _answer(
    service: InferenceService, endpoint: str, outcome: Outcome, render: Render
) -> dict[str, Any]:
    """Render one image's response fields, timing the postprocess stage around it."""
    started = time.perf_counter()
    fields = render(outcome)
    post = time.perf_counter() - started
    service.metrics.stage(endpoint, "postprocess").observe(post)
    result = outcome.result
    fields["timing"] = {
        "decode_ms": round(outcome.decode_seconds * 1e3, 3),
        "preprocess_ms": round(outcome.preprocess_seconds * 1e3, 3),
        "queue_ms": round(result.queue_seconds * 1e3, 3),
        "inference_ms": round(result.infer_seconds * 1e3, 3),
        "postprocess_ms": round(post * 1e3, 3),
        "batch_size": result.batch_size,
    }
    return fields


def deadline_for(service: InferenceService) -> float:
    return time.monotonic() + service.settings.request_timeout_s


async def _single(
    request: Request, service: InferenceService, endpoint: str, render: Render
) -> JSONResponse:
    deadline = deadline_for(service)
    (data,) = await read_images(request, field=SINGLE_FIELD, max_images=1)
    content = await answer_one(service, endpoint, data, render, request.receive, deadline)
    return JSONResponse(content)


async def answer_one(
    service: InferenceService,
    endpoint: str,
    data: bytes,
    render: Render,
    receive: Receive,
    deadline: float,
) -> dict[str, Any]:
    """Answer one uploaded image: admit, predict (until the client hangs up), render.

    The single-image routes' work, shared with the direct lane (service.routes.direct).
    """
    # Admitted here, in the request's own task: a task that ran predict would first run a loop
    # turn later, and in a burst other requests would pass the door's look in between.
    ticket = service.admit(1)
    try:
        outcome = await until_disconnect(
            receive, service.predict(data, endpoint, deadline, ticket=ticket, want=render.want)
        )
    finally:
        ticket.release_all()  # predict released it, unless cancelled before it began
    card = service.card
    assert card is not None
    return {"model": card.name, **_answer(service, endpoint, outcome, render)}


async def _batch(
    request: Request, service: InferenceService, endpoint: str, render: Render
) -> JSONResponse:
    deadline = deadline_for(service)
    images = await read_images(
        request, field=BATCH_FIELD, max_images=service.settings.max_images_per_request
    )

    # The whole request is admitted or refused (429) before any of its images is decoded.
    ticket = service.admit(len(images))

    async def one(index: int, data: bytes) -> dict[str, Any]:
        try:
            outcome = await service.predict(
                data, endpoint, deadline, ticket=ticket, want=render.want
            )
            return {"index": index, "result": _answer(service, endpoint, outcome, render)}
        except Exception as exc:  # one bad image fails only its own entry
            error = to_api_error(exc)
            if error.status >= 500 and not isinstance(exc, ApiError):
                log.error("image %d of a batch request failed", index, exc_info=exc)
            service.metrics.failed(error.code)
            return {"index": index, **error_body(error)}

    try:
        work = asyncio.gather(*(one(i, data) for i, data in enumerate(images)))
        results = await until_disconnect(request.receive, work)
    finally:
        ticket.release_all()
    name = service.card.name if service.card else None
    return JSONResponse({"model": name, "results": results})
