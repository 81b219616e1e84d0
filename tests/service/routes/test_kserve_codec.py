"""Every malformed KServe v2 infer request is a 400 that names its field, never a 500.

Property-based: hypothesis puts a JSON value of every kind the field may not hold into each
field of a valid request in turn (JSON and binary forms), and into the header length.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from service.app import create_app
from tests.service.helpers import make_image, repository_settings

URL = "/v2/models/hiera_micro/infer"
_IMAGE = make_image(3, size=(64, 48))
_B64 = base64.b64encode(_IMAGE).decode()
_RAW = struct.pack("<I", len(_IMAGE)) + _IMAGE

# One valid request in each form; every case below breaks exactly one field of it.
JSON_BODY: dict[str, Any] = {
    "id": "req-1",
    "parameters": {"binary_data_output": False},
    "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [_B64]}],
    "outputs": [{"name": "logits", "parameters": {"classification": 2, "binary_data": False}}],
}
BINARY_HEADER: dict[str, Any] = {
    "inputs": [
        {"name": "image_bytes", "datatype": "BYTES", "shape": [1],
         "parameters": {"binary_data_size": len(_RAW)}}
    ],
    "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
}  # fmt: skip

KINDS = ("null", "boolean", "integer", "number", "string", "list", "object")
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_BY_KIND = {
    "null": st.none(),
    "boolean": st.booleans(),
    # Past 64 bits too: orjson reads those as floats, and must still be refused.
    "integer": st.integers(min_value=-(2**70), max_value=2**70),
    "number": st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
    "string": st.text(max_size=20),
    "list": st.lists(_SCALARS, max_size=4),
    "object": st.dictionaries(st.text(max_size=8), _SCALARS, max_size=3),
}

# (form, path into the header, the kinds the field may hold, what the error must name).
FIELDS: list[tuple[str, tuple[str | int, ...], set[str], str]] = [
    ("json", ("inputs",), {"list"}, "inputs"),
    ("json", ("inputs", 0), {"object"}, "inputs[0]"),
    ("json", ("inputs", 0, "name"), {"string"}, "inputs[0].name"),
    ("json", ("inputs", 0, "datatype"), {"string"}, "inputs[0].datatype"),
    ("json", ("inputs", 0, "shape"), {"list"}, "inputs[0].shape"),
    ("json", ("inputs", 0, "shape", 0), {"integer"}, "inputs[0].shape"),
    ("json", ("inputs", 0, "data"), {"list"}, "inputs[0].data"),
    # A list there is nesting (data may be flat or nested like the shape).
    ("json", ("inputs", 0, "data", 0), {"string", "list"}, "inputs[0].data[0]"),
    ("json", ("inputs", 0, "parameters"), {"object", "null"}, "inputs[0].parameters"),
    ("json", ("parameters",), {"object", "null"}, "parameters"),
    ("json", ("parameters", "binary_data_output"), {"boolean"}, "binary_data_output"),
    ("json", ("outputs",), {"list", "null"}, "outputs"),
    ("json", ("outputs", 0), {"object"}, "outputs[0]"),
    ("json", ("outputs", 0, "name"), {"string"}, "outputs[0].name"),
    ("json", ("outputs", 0, "parameters"), {"object", "null"}, "outputs[0].parameters"),
    ("json", ("outputs", 0, "parameters", "classification"), {"integer"},
     "outputs[0].parameters.classification"),
    ("json", ("outputs", 0, "parameters", "binary_data"), {"boolean"},
     "outputs[0].parameters.binary_data"),
    ("json", ("id",), {"string", "null"}, "'id'"),
    ("binary", ("inputs", 0, "parameters", "binary_data_size"), {"integer", "null"},
     "binary_data_size"),
    ("binary", ("inputs", 0, "parameters"), {"object", "null"}, "inputs[0].parameters"),
]  # fmt: skip


@pytest.fixture(scope="module")
def http(micro_repository: Path) -> Iterator[TestClient]:
    # One server for all examples: a 400 never reaches the model, so examples are cheap.
    app = create_app(repository_settings(micro_repository))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.portal is not None
        client.portal.call(app.state.service.loaded.wait)
        assert client.get("/v2/health/ready").status_code == 200
        yield client


def _replaced(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    broken = copy.deepcopy(body)
    parent: Any = broken
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return broken


def _post(http: TestClient, form: str, header: dict[str, Any]) -> Any:
    head = json.dumps(header).encode()
    if form == "json":
        return http.post(URL, content=head)
    return http.post(
        URL, content=head + _RAW, headers={"Inference-Header-Content-Length": str(len(head))}
    )


def _assert_names(answer: Any, needle: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert list(error) == ["error"] and needle in error["error"], error


@pytest.mark.parametrize(("form", "path", "allowed", "needle"), FIELDS,
                         ids=[f"{f[0]}:{f[3]}" for f in FIELDS])  # fmt: skip
def test_the_valid_requests_pass_and_each_field_has_its_kind(
    http: TestClient, form: str, path: tuple[str | int, ...], allowed: set[str], needle: str
) -> None:
    base = JSON_BODY if form == "json" else BINARY_HEADER
    assert _post(http, form, base).status_code == 200
    wrong = [kind for kind in KINDS if kind not in allowed]

    @given(data=st.data())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def each_wrong_kind(data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(wrong), label="kind")
        value = data.draw(_BY_KIND[kind], label="value")
        _assert_names(_post(http, form, _replaced(base, path, value)), needle)

    each_wrong_kind()


@given(header=st.one_of(*(_BY_KIND[k] for k in KINDS if k != "object")))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_header_of_the_wrong_kind_is_refused(http: TestClient, header: Any) -> None:
    _assert_names(http.post(URL, content=json.dumps(header).encode()), "inference header")


@given(length=st.text(max_size=12).filter(lambda t: not (t.isascii() and t.isdigit())))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_header_length_that_is_not_a_length_is_refused(http: TestClient, length: str) -> None:
    head = json.dumps(BINARY_HEADER).encode()
    try:
        headers = {"Inference-Header-Content-Length": length}
        answer = http.post(URL, content=head + _RAW, headers=headers)
    except (UnicodeEncodeError, ValueError):  # not sendable as an HTTP header value at all
        return
    _assert_names(answer, "Inference-Header-Content-Length")


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("inputs", 0, "shape"), [1] * 9, "inputs[0].shape"),
        (("inputs", 0, "shape"), [-1], "inputs[0].shape"),
        (("inputs", 0, "shape"), [2**40], "inputs[0].shape"),
        (("inputs", 0, "shape"), [1, 2], "inputs[0].shape"),
        (("inputs", 0, "datatype"), "FP32", "inputs[0].datatype of 'image_bytes' must be BYTES"),
        (("inputs", 0, "name"), "pixels", "inputs[0].name"),
        (("inputs", 0, "parameters", "binary_data_size"), -1, "binary_data_size"),
        (("inputs", 0, "parameters", "binary_data_size"), 2**64, "binary_data_size"),
        (("inputs", 0, "parameters", "binary_data_size"), 10, "declare 10 bytes"),
    ],
)  # fmt: skip
def test_values_of_the_right_kind_but_out_of_range(
    http: TestClient, path: tuple[str | int, ...], value: Any, needle: str
) -> None:
    _assert_names(_post(http, "binary", _replaced(BINARY_HEADER, path, value)), needle)


@pytest.mark.parametrize(
    "data",
    [[None], [True, 1.0], ["1"], [[1.0], 2.0], {"a": 1}, 1.0],
    ids=["null", "boolean", "string", "ragged", "object", "scalar"],
)
def test_fp32_data_must_be_numbers(http: TestClient, data: Any) -> None:
    header = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": data}]}
    _assert_names(_post(http, "json", header), "inputs[0].data")


def test_an_empty_pixel_tensor_of_huge_dims_is_refused_before_any_reshape(
    http: TestClient,
) -> None:
    big = [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]
    header = {"inputs": [{"name": "images", "datatype": "FP32", "shape": big, "data": []}]}
    _assert_names(_post(http, "json", header), "is empty")
