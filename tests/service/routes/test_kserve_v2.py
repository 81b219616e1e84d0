"""KServe v2 / Open Inference Protocol: the real tritonclient against a running server, and
the protocol's edge cases through the ASGI transport."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model.hiera import BuiltModel
from tests.service.helpers import live_server, make_image, serving
from tests.service.reference import probabilities, reference, top_indices

# Tests marked slow share one real server process per module and drive it with real clients;
# the rest go through the ASGI transport.


@pytest.fixture(scope="module")
def server(micro_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    with live_server(micro_repository, log, "--max-batch-size", "4", "--max-delay-ms", "20") as url:
        yield url


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def _labels(repository: Path) -> list[str]:
    names: list[str] = json.loads((repository / "labels.json").read_text())["names"]
    return names


def _expected_classes(logits: np.ndarray, labels: list[str], k: int) -> list[tuple[int, str]]:
    return [(i, labels[i]) for i in top_indices(logits, k)]


@pytest.mark.slow
def test_server_and_model_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("hiera_micro")
    assert client.is_model_ready("hiera_micro", model_version="1")
    assert not client.is_model_ready("resnet50")
    server = client.get_server_metadata()
    assert server["name"] == "hiera-serve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get_model_metadata("hiera_micro")
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        {"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
    ]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 1000]},
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 128]},
    ]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("resnet50")
    assert unknown.value.status() == "404" and "serves 'hiera_micro'" in unknown.value.message()


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoded_images_with_classification(
    client: triton.InferenceServerClient,
    micro_model: BuiltModel,
    micro_repository: Path,
    binary: bool,
) -> None:
    images = [make_image(s, size=(200 + 10 * s, 150)) for s in range(3)]
    # JPEG bytes are not UTF-8, so JSON mode carries each element as base64 text.
    elements = images if binary else [base64.b64encode(i) for i in images]
    tensor = triton.InferInput("image_bytes", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("embedding", binary_data=binary),
        triton.InferRequestedOutput("logits", binary_data=binary, class_count=4),
    ]
    result = client.infer("hiera_micro", [tensor], outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "hiera_micro"
    embedding, classes = result.as_numpy("embedding"), result.as_numpy("logits")
    assert embedding.shape == (3, 128) and classes.shape == (3, 4)
    labels = _labels(micro_repository)
    for row, data in enumerate(images):
        logits, want = reference(micro_model, data)
        np.testing.assert_allclose(embedding[row], want, rtol=0, atol=1e-4)
        # Binary BYTES come back as bytes, JSON ones as str.
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in classes[row]]
        assert [(int(i), label) for _, i, label in parsed] == _expected_classes(logits, labels, 4)
        scores = probabilities(logits)
        for score, index, _ in parsed:
            assert float(score) == pytest.approx(scores[int(index)], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_pixels(
    client: triton.InferenceServerClient, micro_model: BuiltModel, binary: bool
) -> None:
    pixels = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    tensor = triton.InferInput("images", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    if binary:  # no outputs named: the client asks for every output in binary
        result = client.infer("hiera_micro", [tensor])
    else:
        outputs = [
            triton.InferRequestedOutput(n, binary_data=False) for n in ("logits", "embedding")
        ]
        result = client.infer("hiera_micro", [tensor], outputs=outputs, model_version="1")
    with torch.inference_mode():
        logits, embedding = micro_model.module(torch.from_numpy(pixels))
    np.testing.assert_allclose(result.as_numpy("embedding"), embedding.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("logits"), logits.numpy(), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_errors_reach_tritonclient_with_status_and_message(
    client: triton.InferenceServerClient,
) -> None:
    corrupt = triton.InferInput("image_bytes", [2], "BYTES")
    corrupt.set_data_from_numpy(np.array([make_image(1), b"\xff\xd8\xffnot a jpeg"], np.object_))
    with pytest.raises(InferenceServerException) as bad:
        client.infer("hiera_micro", [corrupt])
    assert bad.value.status() == "400" and bad.value.message().startswith("image_bytes[1]: ")
    assert "JPEG" in bad.value.message()
    wrong = triton.InferInput("images", [1, 3, 32, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException) as shape:
        client.infer("hiera_micro", [wrong])
    assert shape.value.status() == "400" and "[B, 3, 224, 224]" in shape.value.message()
    with pytest.raises(InferenceServerException) as missing:
        client.infer("hiera_micro", [corrupt], model_version="2")
    assert missing.value.status() == "404"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(
    client: triton.InferenceServerClient, micro_model: BuiltModel, algorithm: str
) -> None:
    data = make_image(8)
    tensor = triton.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    result = client.infer(
        "hiera_micro", [tensor], request_compression_algorithm=algorithm,
        outputs=[triton.InferRequestedOutput("embedding")],
    )  # fmt: skip
    _, want = reference(micro_model, data)
    np.testing.assert_allclose(result.as_numpy("embedding")[0], want, rtol=0, atol=1e-4)


def _binary_request(header: dict[str, object], blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


def _bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


async def test_raw_binary_protocol_without_content_type(
    micro_model: BuiltModel, micro_repository: Path
) -> None:
    data = make_image(5)
    blob = _bytes_tensor(data)
    header = {
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 1],
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "embedding", "parameters": {"binary_data": True}},
                    {"name": "logits", "parameters": {"classification": 2}}],
    }  # fmt: skip
    body, headers = _binary_request(header, blob)
    async with serving(micro_repository) as http:
        response = await http.post("/v2/models/hiera_micro/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert "content-type" not in {k.lower() for k in headers}
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    embedding_spec, classes_spec = head["outputs"]
    assert embedding_spec["shape"] == [1, 128] and embedding_spec["datatype"] == "FP32"
    size = embedding_spec["parameters"]["binary_data_size"]
    assert size == 128 * 4 == len(response.content) - length
    logits, want = reference(micro_model, data)
    got = np.frombuffer(response.content[length:], "<f4")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert classes_spec["datatype"] == "BYTES" and classes_spec["shape"] == [1, 2]
    indices = [int(e.split(":")[1]) for e in classes_spec["data"]]
    assert indices == top_indices(logits, 2)


_NAN = np.full((1, 3, 224, 224), np.nan, "<f4").tobytes()


def _image_input(blob: bytes, **overrides: object) -> dict[str, object]:
    return {"name": "image_bytes", "datatype": "BYTES", "shape": [1],
            "parameters": {"binary_data_size": len(blob)}} | overrides  # fmt: skip


@pytest.mark.parametrize(
    ("header", "blob", "status", "needle"),
    [
        ({"inputs": []}, b"", 400, "exactly one tensor"),
        ({"inputs": [_image_input(b"abcd")]}, b"abc", 400, "declare 4 bytes"),
        ({"inputs": [_image_input(b"\x09\x00\x00\x00ab")]}, b"\x09\x00\x00\x00ab", 400,
         "past the end"),
        ({"inputs": [_image_input(b"", name="pixels")]}, b"", 400, "unknown input 'pixels'"),
        ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                      "data": ["not base64!"]}]}, b"", 400, "base64"),
        ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 224, 224],
                      "parameters": {"binary_data_size": len(_NAN)}}]}, _NAN, 400, "NaN"),
        ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]},
         b"", 400, "[B, 3, 224, 224]"),
        ({"inputs": [_image_input(_bytes_tensor(make_image(1)))],
          "outputs": [{"name": "scores"}]}, _bytes_tensor(make_image(1)), 400, "unknown output"),
        ({"inputs": [_image_input(_bytes_tensor(make_image(1)))],
          "outputs": [{"name": "logits", "parameters": {"classification": 101}}]},
         _bytes_tensor(make_image(1)), 400, "classification must be <= 100"),
        ({"inputs": [_image_input(_bytes_tensor(b"", b""), shape=[2])]},
         _bytes_tensor(b"", b""), 400, "empty"),
        ({"inputs": [_image_input(_bytes_tensor(*[b"x"] * 3), shape=[3])]},
         _bytes_tensor(*[b"x"] * 3), 413, "exceed the limit of 2"),
    ],
)  # fmt: skip
async def test_bad_requests_get_protocol_errors(
    micro_repository: Path, header: dict[str, object], blob: bytes, status: int, needle: str
) -> None:
    body, headers = _binary_request(header, blob)
    async with serving(micro_repository, max_images_per_request=2) as http:
        response = await http.post("/v2/models/hiera_micro/infer", content=body, headers=headers)
        after = await http.post(
            "/v2/models/hiera_micro/infer",
            json={"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                              "data": [base64.b64encode(make_image(2)).decode()]}]},
        )  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()
    assert list(error) == ["error"] and isinstance(error["error"], str)
    assert needle in error["error"], error
    assert after.status_code == 200  # the server is unharmed


async def test_compression_is_bounded_and_checked(micro_repository: Path) -> None:
    bomb = gzip.compress(b"{" + b" " * 100_000 + b"}")  # ~100 KB inflated from a few hundred
    assert len(bomb) < 4096
    url = "/v2/models/hiera_micro/infer"
    async with serving(micro_repository, max_body_bytes=4096) as http:
        inflated = await http.post(url, content=bomb, headers={"Content-Encoding": "gzip"})
        brotli = await http.post(url, content=b"x", headers={"Content-Encoding": "br"})
        broken = await http.post(url, content=b"not gzip", headers={"Content-Encoding": "gzip"})
        cut = await http.post(url, content=gzip.compress(b'{"inputs": []}')[:-12],
                              headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert inflated.status_code == 413 and "once decompressed" in inflated.json()["error"]
    assert brotli.status_code == 415 and "'br' is not supported" in brotli.json()["error"]
    assert broken.status_code == 400 and "not valid gzip" in broken.json()["error"]
    assert cut.status_code == 400 and "truncated" in cut.json()["error"]


async def test_body_limit_and_invalid_json_use_the_protocol_shape(micro_repository: Path) -> None:
    async with serving(micro_repository, max_body_bytes=4096) as http:
        big = await http.post("/v2/models/hiera_micro/infer", content=b"{" + b" " * 5000 + b"}")
        garbled = await http.post("/v2/models/hiera_micro/infer", content=b"\x00\x01binary")
        meta = await http.get("/v2/models/hiera_micro/versions/7")
    assert big.status_code == 413 and "exceeds 4096 bytes" in big.json()["error"]
    assert (
        garbled.status_code == 400 and "Inference-Header-Content-Length" in garbled.json()["error"]
    )
    assert meta.status_code == 404 and "version '7'" in meta.json()["error"]
