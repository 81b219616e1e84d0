"""KServe v2 / Open Inference Protocol over gRPC: Triton's `inference.GRPCInferenceService`.

The REST routes' logic with a gRPC face: the same model card checks, admission, limits,
helpers that turn outcomes into output tensors, and Triton config and statistics. Errors
keep errors.py's mapping, then take the gRPC code of their HTTP status (`GRPC_CODES`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format

from service.auth import KeyRing
from service.card import ModelCard
from service.errors import ApiError, log_answer, to_api_error
from service.front import Answering
from service.grpc_stubs import grpc_service_pb2 as pb
from service.grpc_stubs import grpc_service_pb2_grpc as pb_grpc
from service.inference import InferenceService, Outcome
from service.metrics import Metrics
from service.middleware import RequestIds
from service.routes import kserve_codec as codec
from service.routes import kserve_v2, triton
from service.routes.protocol import all_or_nothing

log = logging.getLogger(__name__)

ENDPOINT = "grpc_infer"
# The gRPC status of each HTTP status errors.py gives (anything else: INTERNAL).
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Trailing metadata of a refusal (429, 503): seconds to wait, as HTTP's Retry-After.
RETRY_AFTER_KEY = "retry-after"

Message = TypeVar("Message")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answer the protocol's RPCs from one InferenceService (the app's)."""

    def __init__(self, service: InferenceService, metrics: Metrics, keys: KeyRing | None):
        self.service = service
        self.metrics = metrics
        self.keys = keys
        self.ids = RequestIds()

    # Health: open, like /v2/health/*.
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=not self.service.broken)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def answer() -> Any:
            card = self.service.card
            known = card is not None and request.name == card.name
            version_ok = request.version in ("", kserve_v2.MODEL_VERSION)
            # An unknown model is not ready, not an error (tritonclient's is_model_ready).
            return pb.ModelReadyResponse(ready=known and version_ok and self.service.ready)

        return await self._call(context, "grpc_model_ready", answer)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        extensions = kserve_v2.EXTENSIONS

        async def answer() -> Any:
            return pb.ServerMetadataResponse(
                name=kserve_v2.SERVER_NAME, version=kserve_v2.SERVER_VERSION, extensions=extensions
            )

        return await self._call(context, "grpc_server_metadata", answer)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def answer() -> Any:
            card = self._card(request.name, request.version)
            body = kserve_v2.metadata(self.service, card)
            return json_format.ParseDict(body, pb.ModelMetadataResponse())

        return await self._call(context, "grpc_model_metadata", answer)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def answer() -> Any:
            card = self._card(request.name, request.version)
            body = {"config": triton.served_config(self.service, card)}
            return json_format.ParseDict(body, pb.ModelConfigResponse())

        return await self._call(context, "grpc_model_config", answer)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def answer() -> Any:
            version = request.version or kserve_v2.MODEL_VERSION
            card = self._card(request.name, version) if request.name else self.service.card
            stats = [] if card is None else [
                triton.model_statistics(self.metrics, card.name, version)
            ]  # fmt: skip
            return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

        return await self._call(context, "grpc_model_statistics", answer)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self._authorized(context):  # as ApiKeyMiddleware: refused before it is received
            self.metrics.failed("unauthorized")
            return await self._abort(context, _unauthorized(), None)
        incoming = _metadata(context).get("x-request-id")
        request_id = self.ids.of(incoming.encode() if incoming else None)
        with Answering(self.metrics, ENDPOINT, request_id, time.perf_counter()) as answer:
            try:
                response = await self._infer(request, context)
            except asyncio.CancelledError:
                # The client cancelled, or its deadline passed (gRPC cancels the call then).
                remaining = context.time_remaining()
                answer.status = 504 if remaining is not None and remaining <= 0 else 499
                self.metrics.failed("deadline_exceeded" if answer.status == 504 else "cancelled")
                raise
            except Exception as exc:
                error = to_api_error(exc)
                answer.status = error.status
                self.metrics.failed(error.code)
                return await self._abort(context, error, exc)
            answer.status = 200
            return response

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        service = self.service
        refused = service.refusal()  # the cheap look first, as the REST door does
        if refused is not None:
            raise refused
        timeout = service.settings.request_timeout_s
        remaining = context.time_remaining()
        deadline = time.monotonic() + (timeout if remaining is None else min(timeout, remaining))
        card = self._card(request.model_name, request.model_version)
        parsed = parse_infer_request(request)
        kserve_v2._check_classification(service, parsed.outputs)
        want = kserve_v2.wanted(card, parsed.outputs)
        outcomes: list[Outcome]
        if parsed.images is not None:
            kserve_v2._check_count(service, len(parsed.images))
            ticket = service.admit(len(parsed.images))  # admitted or refused whole
            work = [
                kserve_v2._predict(service, data, index, deadline, ticket, want, ENDPOINT)
                for index, data in enumerate(parsed.images)
            ]
            try:
                outcomes = await all_or_nothing(work)
            finally:
                ticket.release_all()
        else:
            assert parsed.pixels is not None
            kserve_v2._check_count(service, parsed.pixels.shape[0] if parsed.pixels.ndim else 0)
            outcomes = await service.predict_pixels(parsed.pixels, ENDPOINT, deadline, want)
        started = time.perf_counter()
        response = pb.ModelInferResponse(
            model_name=card.name, model_version=kserve_v2.MODEL_VERSION, id=request.id
        )
        for spec in parsed.outputs:
            out = kserve_v2._output(card, service, spec, outcomes)
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            if isinstance(out.values, np.ndarray):
                response.raw_output_contents.append(out.values.astype("<f4").tobytes())
            else:
                response.raw_output_contents.append(codec.serialize_bytes(out.values))
        self.metrics.stage(ENDPOINT, "postprocess").observe(time.perf_counter() - started)
        return response

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        endpoint: str,
        answer: Callable[[], Awaitable[Message]],
    ) -> Message:
        """Run a metadata RPC's `answer`: key checked, counted, errors mapped."""
        started = time.perf_counter()
        status = 200
        try:
            if not self._authorized(context):
                raise _unauthorized()
            return await answer()
        except Exception as exc:
            error = to_api_error(exc)
            status = error.status
            self.metrics.failed(error.code)
            return await self._abort(context, error, exc)
        finally:
            self.metrics.request_done(endpoint, status, time.perf_counter() - started)

    def _card(self, name: str, version: str) -> ModelCard:
        return kserve_v2._card(self.service, name, version or kserve_v2.MODEL_VERSION)

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if self.keys is None:
            return True
        # KeyRing reads ASGI-style headers; gRPC metadata keys are lower-case already.
        headers = [(k.encode(), v.encode()) for k, v in _metadata(context).items()]
        return self.keys.admits({"headers": headers})

    async def _abort(
        self, context: grpc.aio.ServicerContext, error: ApiError, exc: BaseException | None
    ) -> Any:
        log_answer(error, exc if exc is not None else error)
        retry = error.headers.get("Retry-After")
        if retry is not None:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, retry),))
        code = GRPC_CODES.get(error.status, grpc.StatusCode.INTERNAL)
        await context.abort(code, error.message)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Return the call's text metadata (binary `-bin` entries left out)."""
    return {
        key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
    }


def _unauthorized() -> ApiError:
    return ApiError(
        401, "unauthorized",
        "a valid API key is required: send metadata 'authorization: Bearer <key>' or "
        "'x-api-key: <key>'",
    )  # fmt: skip


def parse_infer_request(request: Any) -> codec.InferRequest:
    """Validate a ModelInferRequest's one input and its requested outputs, as the REST codec
    does a JSON header: `contents` or `raw_input_contents`, never both."""
    if len(request.inputs) != 1:
        raise codec.bad_request(
            f"'inputs' must hold exactly one tensor: '{codec.BYTES_INPUT}' (BYTES, encoded "
            f"images) or '{codec.PIXELS_INPUT}' (FP32 [B, 3, H, W] preprocessed pixels)"
        )
    tensor = request.inputs[0]
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    if len(shape) > 8 or not all(0 <= d < 2**31 for d in shape):
        raise codec.bad_request(
            f"inputs[0].shape of '{name}' must be at most 8 non-negative dims, got {shape}"
        )
    count = math.prod(shape)
    raws = list(request.raw_input_contents)
    if len(raws) > 1:
        raise codec.bad_request(f"raw_input_contents holds {len(raws)} tensors for one input")
    if raws and tensor.HasField("contents"):
        raise codec.bad_request(f"input '{name}' has both contents and raw_input_contents")
    if not raws and not tensor.HasField("contents"):
        raise codec.bad_request(f"input '{name}' has neither contents nor raw_input_contents")
    images: list[bytes] | None = None
    pixels: np.ndarray | None = None
    if (name, datatype) == (codec.BYTES_INPUT, "BYTES"):
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise codec.bad_request(f"inputs[0].shape of '{name}' is [B] or [B, 1], got {shape}")
        if count == 0:
            raise codec.bad_request(f"input '{name}' is empty (shape {shape})")
        images = codec.split_bytes(raws[0], count) if raws else list(tensor.contents.bytes_contents)
        if len(images) != count:
            raise codec.bad_request(
                f"contents.bytes_contents holds {len(images)} elements but the shape says {count}"
            )
    elif (name, datatype) == (codec.PIXELS_INPUT, "FP32"):
        if count == 0:
            raise codec.bad_request(f"input '{name}' is empty (shape {shape})")
        if raws:
            values = np.frombuffer(raws[0], "<f4") if len(raws[0]) % 4 == 0 else None
        else:
            values = np.asarray(tensor.contents.fp32_contents, np.float32)
        if values is None or values.size != count:
            raise codec.bad_request(f"FP32 tensor of shape {shape} needs {count} elements")
        pixels = values.astype(np.float32).reshape(shape)
    else:
        raise codec.bad_request(
            f"unknown input '{name}' ({datatype}); this model takes '{codec.BYTES_INPUT}' "
            f"(BYTES) or '{codec.PIXELS_INPUT}' (FP32)"
        )
    return codec.InferRequest(
        id=request.id or None,
        input_name=name,
        images=images,
        pixels=pixels,
        outputs=_requested_outputs(request),
    )


def _requested_outputs(request: Any) -> list[codec.RequestedOutput]:
    if not request.outputs:
        return [codec.RequestedOutput(name, True, 0) for name in codec.OUTPUTS]
    outputs = []
    for index, spec in enumerate(request.outputs):
        if spec.name not in codec.OUTPUTS:
            raise codec.bad_request(
                f"unknown output {spec.name!r} at outputs[{index}]; this model has "
                f"{', '.join(codec.OUTPUTS)}"
            )
        k = 0
        if "classification" in spec.parameters:
            param = spec.parameters["classification"]
            if param.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
                raise codec.bad_request(
                    f"outputs[{index}].parameters.classification must be an integer"
                )
            k = param.int64_param or param.uint64_param
        if k < 0:
            raise codec.bad_request(f"outputs[{index}].parameters.classification must be >= 0")
        if k and spec.name != "logits":
            raise codec.bad_request("classification is only meaningful on the 'logits' output")
        outputs.append(codec.RequestedOutput(spec.name, True, k))
    return outputs
