"""The gRPC face of the Open Inference Protocol, in process: Triton's own generated stub and
tritonclient's asyncio client against the app's gRPC server on the test's event loop.

Real clients against a real server process (tritonclient.grpc, KServe's client, workers) are
in tests/service/test_grpc_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from model.hiera import BuiltModel
from service.app import create_app
from service.batching import QueueFull
from tests.service.helpers import (
    free_port,
    make_image,
    repository_settings,
    running,
    sample,
    wait_until,
)
from tests.service.reference import reference, top_indices

MODEL = "hiera_micro"


@contextlib.asynccontextmanager
async def grpc_app(repository: Path, **overrides: Any) -> AsyncIterator[tuple[Any, str]]:
    port = free_port()
    app = create_app(repository_settings(repository, grpc_port=port, **overrides))
    async with running(app):
        yield app, f"127.0.0.1:{port}"


def _image_request(*images: bytes, **outputs: int) -> pb.ModelInferRequest:
    """A request as tritonclient.grpc builds one: raw_input_contents, BYTES length-prefixed."""
    request = pb.ModelInferRequest(model_name=MODEL, id="r1")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[len(images)])
    raw = b"".join(len(d).to_bytes(4, "little") + d for d in images)
    request.raw_input_contents.append(raw)
    for name, k in outputs.items():
        output = request.outputs.add(name=name)
        if k:
            output.parameters["classification"].int64_param = k
    return request


async def _fail(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value


async def test_contents_and_raw_forms_agree_with_the_model(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    images = [make_image(5), make_image(6)]
    async with (
        grpc_app(micro_repository) as (app, target),
        grpc.aio.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        raw = await stub.ModelInfer(_image_request(*images, logits=2, embedding=0))
        contents = pb.ModelInferRequest(model_name=MODEL, model_version="1")
        tensor = contents.inputs.add(name="image_bytes", datatype="BYTES", shape=[2, 1])
        tensor.contents.bytes_contents.extend(images)
        answered = await stub.ModelInfer(contents)
    assert raw.model_name == MODEL and raw.model_version == "1" and raw.id == "r1"
    assert [(o.name, o.datatype, list(o.shape)) for o in raw.outputs] == [
        ("logits", "BYTES", [2, 2]), ("embedding", "FP32", [2, 128])
    ]  # fmt: skip
    embeddings = np.frombuffer(raw.raw_output_contents[1], "<f4").reshape(2, 128)
    got = np.frombuffer(answered.raw_output_contents[1], "<f4").reshape(2, 128)
    for row, data in enumerate(images):
        logits, embedding = reference(micro_model, data)
        np.testing.assert_allclose(embeddings[row], embedding, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got[row], embedding, rtol=0, atol=1e-4)
    # No outputs asked for: every output, raw.
    assert [o.name for o in answered.outputs] == ["logits", "embedding"]
    # The classification strings: BYTES elements, length-prefixed like any raw BYTES tensor.
    blob, labels = raw.raw_output_contents[0], []
    while blob:
        size = int.from_bytes(blob[:4], "little")
        labels.append(blob[4 : 4 + size].decode())
        blob = blob[4 + size :]
    logits, _ = reference(micro_model, images[0])
    assert [int(e.split(":")[1]) for e in labels[:2]] == top_indices(logits, 2)
    assert sample(app, "hiera_request_outcomes_total", endpoint="grpc_infer", outcome="ok") == 2
    assert sample(app, "hiera_stage_duration_seconds_count", endpoint="grpc_infer",
                  stage="inference") == 4  # fmt: skip


async def test_preprocessed_pixels_as_raw_fp32(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    from tests.service.reference import model_input, timm_outputs

    data = make_image(7)
    pixels = model_input(micro_model, data).numpy()  # [1, 3, 224, 224]
    async with grpc_app(micro_repository) as (_, target):
        client = triton_aio.InferenceServerClient(target)
        tensor = triton_aio.InferInput("images", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels.astype(np.float32))
        result = await client.infer(MODEL, [tensor])
        await client.close()
    _, want = timm_outputs(micro_model, model_input(micro_model, data))
    np.testing.assert_allclose(result.as_numpy("embedding")[0], want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "code", "needle"),
    [
        ({"model_name": "resnet50"}, grpc.StatusCode.NOT_FOUND, "serves 'hiera_micro'"),
        ({"model_version": "7"}, grpc.StatusCode.NOT_FOUND, "version '7'"),
        ({"image": b"not an image"}, grpc.StatusCode.INVALID_ARGUMENT, "image_bytes[0]"),
        ({"input": "pixels"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'pixels'"),
        ({"output": "scores"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'scores'"),
        ({"classification": 101}, grpc.StatusCode.INVALID_ARGUMENT, "must be <= 100"),
        ({"count": 3}, grpc.StatusCode.INVALID_ARGUMENT, "exceed the limit of 2"),
        ({"shape": [2]}, grpc.StatusCode.INVALID_ARGUMENT, "holds 1 elements but its shape"),
    ],
)  # fmt: skip
async def test_bad_requests_are_invalid_argument_or_not_found(
    micro_repository: Path, change: dict[str, Any], code: grpc.StatusCode, needle: str
) -> None:
    request = _image_request(
        *[change.get("image", make_image(1))] * change.get("count", 1),
        logits=change.get("classification", 1),
    )
    request.model_name = change.get("model_name", MODEL)
    request.model_version = change.get("model_version", "")
    request.inputs[0].name = change.get("input", "image_bytes")
    if "shape" in change:
        request.inputs[0].ClearField("shape")
        request.inputs[0].shape.extend(change["shape"])
    if "output" in change:
        request.outputs[0].name = change["output"]
    async with grpc_app(micro_repository, max_images_per_request=2) as (app, target):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            error = await _fail(stub.ModelInfer(request))
            after = await stub.ModelInfer(_image_request(make_image(2)))
        invalid = sample(app, "hiera_request_outcomes_total", endpoint="grpc_infer",
                         outcome="invalid")  # fmt: skip
    assert error.code() == code and needle in (error.details() or ""), error.details()
    assert invalid == 1 and after.outputs  # counted once; the server unharmed


async def test_full_queue_and_draining_say_when_to_retry(micro_repository: Path) -> None:
    async with grpc_app(micro_repository) as (app, target):
        service = app.state.service
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            service.refusal = lambda: QueueFull("queue full", retry_after_s=3)
            full = await _fail(stub.ModelInfer(_image_request(make_image(1))))
            del service.refusal
            service.state, service.reason = "draining", "shutting down"
            draining = await _fail(stub.ModelInfer(_image_request(make_image(1))))
            ready = await stub.ServerReady(pb.ServerReadyRequest())
            live = await stub.ServerLive(pb.ServerLiveRequest())
        rejected = sample(app, "hiera_request_outcomes_total", endpoint="grpc_infer",
                          outcome="rejected")  # fmt: skip
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(full.trailing_metadata() or ())["retry-after"] == "3"
    assert draining.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (draining.details() or "")
    assert dict(draining.trailing_metadata() or ())["retry-after"] == "5"
    assert not ready.ready and live.live and rejected == 2


async def test_unavailable_while_loading(micro_repository: Path) -> None:
    app = create_app(repository_settings(micro_repository, grpc_port=(port := free_port())))
    service = app.state.service
    gate = asyncio.Event()
    load = service.load

    async def held() -> None:
        await gate.wait()
        await load()

    service.load = held
    lifespan = app.router.lifespan_context(app)
    async with lifespan, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        loading = await _fail(stub.ModelInfer(_image_request(make_image(1))))
        metadata = await _fail(stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL)))
        ready = await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))
        gate.set()
        await service.loaded.wait()
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    assert loading.code() == metadata.code() == grpc.StatusCode.UNAVAILABLE
    assert "loading" in (loading.details() or "") and not ready.ready


class _Held:
    """A predict that never finishes, recording that it was entered and then cancelled."""

    def __init__(self) -> None:
        self.entered = 0
        self.cancelled = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_cancelled_and_timed_out_calls_leave_before_the_model(
    micro_repository: Path,
) -> None:
    async with grpc_app(micro_repository) as (app, target):
        held = app.state.service.predict = _Held()
        batches = sample(app, "hiera_batch_size_count")
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer(_image_request(make_image(1), make_image(2)))
            await wait_until(lambda: held.entered == 2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await wait_until(lambda: held.cancelled == 2)
            late = await _fail(stub.ModelInfer(_image_request(make_image(3)), timeout=0.3))
            await wait_until(lambda: held.cancelled == 3)

        def outcome(name: str) -> float:
            return sample(app, "hiera_request_outcomes_total", endpoint="grpc_infer",
                          outcome=name)  # fmt: skip

        await wait_until(lambda: outcome("cancelled") == 1 and outcome("timed_out") == 1)
        assert sample(app, "hiera_admitted_images") == 0  # every ticket released
        assert sample(app, "hiera_batch_size_count") == batches  # nothing reached the model
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_grpc_deadline_is_the_request_deadline(micro_repository: Path) -> None:
    async with grpc_app(micro_repository) as (app, target):
        seen: list[float] = []
        real = app.state.service.predict

        async def spy(data: bytes, endpoint: str, deadline: float, **kwargs: Any) -> Any:
            # The deadline's own clock: a loop's time() may be cached (uvloop's lags by a
            # loop turn), which read a 20 s deadline as 20.1 s on a loaded host.
            seen.append(deadline - time.monotonic())
            return await real(data, endpoint, deadline, **kwargs)

        app.state.service.predict = spy
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(_image_request(make_image(1)), timeout=20)
            await stub.ModelInfer(_image_request(make_image(1)))
    assert 15 < seen[0] <= 20 and 25 < seen[1] <= 30  # request_timeout_s is 30


async def test_api_keys_in_metadata(micro_repository: Path) -> None:
    async with grpc_app(micro_repository, api_keys=["k-1", "k-2"]) as (app, target):
        client = triton_aio.InferenceServerClient(target)
        assert await client.is_server_live() and await client.is_server_ready()
        with pytest.raises(InferenceServerException) as refused:
            await client.get_model_metadata(MODEL)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        bearer = await client.get_model_metadata(MODEL, headers={"authorization": "Bearer k-1"})
        assert bearer.name == MODEL
        tensor = triton_aio.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([make_image(1)], dtype=object))
        with pytest.raises(InferenceServerException) as wrong:
            await client.infer(MODEL, [tensor], headers={"x-api-key": "k-3"})
        result = await client.infer(MODEL, [tensor], headers={"x-api-key": "k-2"})
        await client.close()
        unauthorized = sample(app, "hiera_failures_total", reason="unauthorized")
    assert wrong.value.status() == "StatusCode.UNAUTHENTICATED"
    assert result.as_numpy("embedding").shape == (1, 128) and unauthorized == 2


async def test_abandoned_calls_leave_the_real_queue_before_the_model(
    micro_repository: Path,
) -> None:
    # Batches form only after 3 s (or 8 images): the images wait in the batcher's queue.
    slow = {"max_batch_size": 8, "max_delay_ms": 3000.0, "batch_wait_when_idle": True}
    async with grpc_app(micro_repository, **slow) as (app, target):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer(_image_request(make_image(1), make_image(2)))
            late = stub.ModelInfer(_image_request(make_image(3)), timeout=1.0)
            await wait_until(lambda: sample(app, "hiera_queue_depth") == 3)
            call.cancel()
            assert (await _fail(late)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The deadline drops the late one in the queue (or gRPC's cancel does, if first).
            await wait_until(
                lambda: (
                    sample(app, "hiera_dropped_total", reason="cancelled")
                    + sample(app, "hiera_dropped_total", reason="deadline")
                    == 3
                )
            )
        # Nothing is left to batch, and nothing was: not one image reached the model.
        assert sample(app, "hiera_queue_depth") == 0
        assert sample(app, "hiera_batch_size_count") == 0
        assert sample(app, "hiera_admitted_images") == 0
