"""OpenAI-compatible embeddings: the real `openai` client and LangChain against a running
server, and the request forms and errors through the ASGI transport."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from langchain_openai import OpenAIEmbeddings

from model.hiera import BuiltModel
from tests.service.helpers import live_server, make_image, serving
from tests.service.reference import reference, unit

# Tests marked slow share one real server process per module and drive it with real clients;
# the rest go through the ASGI transport.


@pytest.fixture(scope="module")
def server(micro_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("openai") / "server.log"
    with live_server(micro_repository, log, "--max-embedding-inputs", "4") as url:
        yield url


def _data_uri(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


@pytest.mark.slow
def test_openai_client_base64_default_and_float(server: str, micro_model: BuiltModel) -> None:
    images = [make_image(s, fmt="PNG" if s % 2 else "JPEG") for s in range(3)]
    inputs = [_data_uri(d, "png" if s % 2 else "jpeg") for s, d in enumerate(images)]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    # Omitting encoding_format makes the client ask for base64 and decode it itself.
    packed = client.embeddings.create(model="hiera-embed", input=inputs)
    floats = client.embeddings.create(model="hiera-embed", input=inputs, encoding_format="float")
    assert packed.model == "hiera-embed" and packed.object == "list"
    assert [d.index for d in packed.data] == [0, 1, 2]
    assert packed.usage.prompt_tokens == 0
    for data, a, b in zip(images, packed.data, floats.data, strict=True):
        _, want = reference(micro_model, data)
        np.testing.assert_allclose(a.embedding, unit(want), rtol=0, atol=1e-5)
        # Requests may land in batches of other sizes: ORT's sums differ in the last bits.
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=0, atol=1e-5)
    single = client.embeddings.create(model="m", input=inputs[0], dimensions=128)
    np.testing.assert_allclose(single.data[0].embedding, packed.data[0].embedding, atol=1e-5)


@pytest.mark.slow
def test_openai_client_sees_openai_shaped_errors(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as url:
        client.embeddings.create(model="m", input="https://example.com/cat.jpg")
    assert url.value.status_code == 400
    assert url.value.body == {
        "message": url.value.body["message"],  # type: ignore[index]
        "type": "invalid_request_error",
        "param": "input",
        "code": "invalid_embeddings_request",
    }
    assert "never fetched" in url.value.message and "data:image/jpeg;base64" in url.value.message
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model="m", input=[[101, 2023, 102]])
    assert "check_embedding_ctx_length=False" in tokens.value.message
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model="m", input=_data_uri(make_image(1)), dimensions=64)
    assert "null or 128" in dims.value.message
    with pytest.raises(openai.APIStatusError) as many:
        client.embeddings.create(model="m", input=[_data_uri(make_image(1))] * 5)
    assert many.value.status_code == 413 and "limit of 4" in many.value.message
    with pytest.raises(openai.APIStatusError) as text:  # base64 of "hello": not an image
        client.embeddings.create(model="m", input=[_data_uri(make_image(1)), "aGVsbG8="])
    assert text.value.status_code == 415
    assert text.value.body["param"] == "input[1]"  # type: ignore[index]
    assert text.value.body["code"] == "unsupported_format"  # type: ignore[index]


@pytest.mark.slow
def test_langchain_embeddings(server: str, micro_model: BuiltModel) -> None:
    images = [make_image(10 + s) for s in range(3)]
    embedder = OpenAIEmbeddings(
        model="hiera_micro", base_url=f"{server}/v1", api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False, max_retries=0,
    )  # fmt: skip
    documents = embedder.embed_documents([_data_uri(d) for d in images])
    query = embedder.embed_query(_data_uri(images[0]))
    for data, got in zip(images, documents, strict=True):
        _, want = reference(micro_model, data)
        np.testing.assert_allclose(got, unit(want), rtol=0, atol=1e-5)
    np.testing.assert_allclose(query, documents[0], rtol=0, atol=1e-5)


async def test_every_input_form_embeds_the_same_image(
    micro_repository: Path, micro_model: BuiltModel
) -> None:
    data = make_image(20)
    raw = base64.b64encode(data).decode()
    wrapped = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))  # as `base64` prints
    forms: list[Any] = [
        _data_uri(data),
        raw,
        wrapped,
        {"type": "image_url", "image_url": {"url": _data_uri(data)}},
        {"image": raw},
    ]
    async with serving(micro_repository) as http:
        response = await http.post(
            "/v1/embeddings",
            json={"model": "x", "input": forms, "user": "u1", "modality": "image"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"object", "model", "data", "usage"}
    _, want = reference(micro_model, data)
    for item in body["data"]:
        assert item["object"] == "embedding"
        np.testing.assert_allclose(item["embedding"], unit(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "status", "param", "needle"),
    [
        ({"input": "aGk="}, 400, "model", "'model' is required"),
        ({"model": "m"}, 400, "input", "'input' must be"),
        ({"model": "m", "input": []}, 400, "input", "'input' must be"),
        ({"model": "m", "input": [1, 2, 3]}, 400, "input", "token ids"),
        ({"model": "m", "input": "aGk=", "encoding_format": "int8"}, 400, "encoding_format",
         "'float' or 'base64'"),
        ({"model": "m", "input": ["file:///etc/passwd"]}, 400, "input[0]", "not a file: URI"),
        ({"model": "m", "input": ["HTTP://10.0.0.1/x.jpg"]}, 400, "input[0]", "never fetched"),
        ({"model": "m", "input": [{"image_url": {"url": "http://a/b.png"}}]}, 400,
         "input[0].image_url.url", "never fetched"),
        ({"model": "m", "input": ["data:image/png,rawbytes"]}, 400, "input[0]", "base64 data URI"),
        ({"model": "m", "input": ["not base64!"]}, 400, "input[0]", "not valid base64"),
        ({"model": "m", "input": [{"text": "hi"}]}, 400, "input[0]", "got dict"),
        ({"model": "m", "input": ["", "aGk="]}, 400, "input[0]", "empty"),
        ({"model": "m", "input": ["R0lGODlh"]}, 400, "input[0]", "GIF image but its header"),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors(
    micro_repository: Path, payload: dict[str, Any], status: int, param: str, needle: str
) -> None:
    async with serving(micro_repository) as http:
        response = await http.post("/v1/embeddings", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert needle in error["message"], error


async def test_body_limit_and_bad_json_use_the_openai_shape(micro_repository: Path) -> None:
    async with serving(micro_repository, max_body_bytes=4096) as http:
        big = await http.post("/v1/embeddings", json={"model": "m", "input": "A" * 8000})
        garbled = await http.post("/v1/embeddings", content=b"{nope")
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "body_too_large"
    assert big.json()["error"]["type"] == "invalid_request_error"
    assert garbled.status_code == 400 and "not valid JSON" in garbled.json()["error"]["message"]
