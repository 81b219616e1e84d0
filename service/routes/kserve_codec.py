"""KServe v2 / Open Inference Protocol bodies: JSON, and the binary tensor data extension.

A binary request is the JSON header followed by raw tensors; `Inference-Header-Content-Length`
gives the header's length and each binary tensor its `parameters.binary_data_size`. A BYTES
tensor in binary form is a sequence of elements, each a little-endian uint32 length followed
by that many bytes. Pure functions over bytes and numpy: no HTTP here.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import ApiError

BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "images"  # the ONNX graph's own input name, so Triton clients work unchanged
OUTPUTS = ("logits", "embedding")
HEADER_LENGTH = "inference-header-content-length"
_LENGTH = struct.Struct("<I")


_PARAMETERS = {"type": "object", "additionalProperties": True}
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": [BYTES_INPUT, PIXELS_INPUT]},
        "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 8},
        "data": {"type": "array", "description": "base64 strings (BYTES) or numbers (FP32)"},
        "parameters": _PARAMETERS,
    },
}
# The JSON form, for /docs and schema-driven clients; the binary form (a JSON header
# followed by raw tensors) is the same object with binary_data_size parameters.
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": _PARAMETERS,
                        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
                        "outputs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(OUTPUTS)},
                                    "parameters": _PARAMETERS,
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_inference_request", message)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int  # top-k as "score:index:label" strings; 0 = the raw tensor


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    input_name: str
    images: list[bytes] | None  # encoded images (BYTES input)
    pixels: np.ndarray | None  # [B, 3, H, W] float32 (FP32 input)
    outputs: list[RequestedOutput]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]  # FP32 array, or BYTES elements
    binary: bool


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a gzip or deflate Content-Encoding (tritonclient can send either), up to `limit`."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(
            415, "unsupported_media_type",
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none",
        )  # fmt: skip
    # gzip has its own header; HTTP's "deflate" means the zlib format.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        # Bounded: a few KB of zeros must not inflate into gigabytes.
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise bad_request(f"the body is not valid {encoding} data") from None
    if len(out) > limit:
        raise ApiError(
            413, "body_too_large", f"request body exceeds {limit} bytes once decompressed"
        )
    if not inflater.eof:
        raise bad_request(f"the {encoding} body is truncated")
    return out


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split the body, validate the one input tensor and the requested outputs.

    Every field of the wrong JSON kind is a 400 that names it (`inputs[0].shape`), never a
    500: the header is whatever a client sent.
    """
    header, blob = _split(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(
            f"'inputs' must hold exactly one tensor: '{BYTES_INPUT}' (BYTES, encoded images) "
            f"or '{PIXELS_INPUT}' (FP32 [B, 3, H, W] preprocessed pixels)"
        )
    spec = inputs[0]
    name = _text(spec, "name", "inputs[0]")
    datatype = _text(spec, "datatype", "inputs[0]")
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_RANK
        or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape)
    ):
        raise bad_request(
            f"inputs[0].shape of input '{name}' must be a list of at most {_MAX_RANK} "
            f"non-negative integers, got {_show(shape)}"
        )
    count = math.prod(shape)
    raw = _binary_part(spec, blob)
    images: list[bytes] | None = None
    pixels: np.ndarray | None = None
    if name == BYTES_INPUT and datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise bad_request(f"inputs[0].shape of '{BYTES_INPUT}' is [B] or [B, 1], got {shape}")
        if count == 0:
            raise bad_request(f"input '{name}' is empty (shape {shape})")
        images = split_bytes(raw, count) if raw is not None else _json_bytes(spec, count)
    elif name == PIXELS_INPUT and datatype == "FP32":
        if count == 0:
            raise bad_request(f"input '{name}' is empty (shape {shape})")
        values = _fp32_values(raw, spec, count)
        pixels = values.reshape(shape)
    elif name in _DATATYPES:
        raise bad_request(
            f"inputs[0].datatype of '{name}' must be {_DATATYPES[name]}, got {datatype!r}"
        )
    else:
        raise bad_request(
            f"unknown input '{name}' ({datatype}) at inputs[0].name; this model takes "
            f"'{BYTES_INPUT}' (BYTES) or '{PIXELS_INPUT}' (FP32)"
        )
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request(f"'id' must be a string, got {_show(request_id)}")
    return InferRequest(
        id=request_id,
        input_name=name,
        images=images,
        pixels=pixels,
        outputs=_requested_outputs(header),
    )


_DATATYPES = {BYTES_INPUT: "BYTES", PIXELS_INPUT: "FP32"}
# Bounds that keep shape arithmetic in machine integers; a real tensor is far inside them
# (the body limit bounds the element count long before).
_MAX_RANK = 8
_MAX_DIM = 2**31 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
          int: "an integer", float: "a number", type(None): "null"}  # fmt: skip


def _show(value: Any) -> str:
    """Name a JSON value's kind for an error message, with a short preview."""
    kind = _KINDS.get(type(value), type(value).__name__)
    preview = repr(value)
    return f"{kind} ({preview[:40]}{'...' if len(preview) > 40 else ''})"


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string, got {_show(value)}")
    return value


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Return `obj`'s optional `parameters` object ({} when absent)."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f"{where}parameters must be an object, got {_show(params)}")
    return params


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f"{where}parameters.{key} must be a boolean, got {_show(value)}")
    return value


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, blob = body, b""
    else:
        # isdigit() alone accepts digits int() refuses ("²"): ASCII only.
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(
            body
        ):
            raise bad_request(
                f"Inference-Header-Content-Length {header_length!r} is not a length within "
                f"the {len(body)}-byte body"
            )
        head, blob = body[: int(header_length)], body[int(header_length) :]
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        hint = "" if header_length else " (binary tensors need Inference-Header-Content-Length)"
        raise bad_request(f"the inference header is not valid JSON: {exc}{hint}") from None
    if not isinstance(header, dict):
        raise bad_request("the inference header must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise bad_request(f"'inputs' must be a list of tensors, got {_show(inputs)}")
    declared = sum(_binary_size(spec, f"inputs[{i}].") or 0 for i, spec in enumerate(inputs))
    if declared != len(blob):
        raise bad_request(
            f"binary tensors declare {declared} bytes (binary_data_size) but {len(blob)} "
            "follow the header"
        )
    return header, blob


def _binary_size(spec: Any, where: str) -> int | None:
    if not isinstance(spec, dict):
        raise bad_request(f"{where.rstrip('.')} must be a tensor object, got {_show(spec)}")
    size = _parameters(spec, where).get("binary_data_size")
    if size is not None and (not _is_int(size) or size < 0):
        raise bad_request(
            f"{where}parameters.binary_data_size must be a non-negative integer, got {_show(size)}"
        )
    return size


def _binary_part(spec: dict[str, Any], blob: bytes) -> bytes | None:
    size = _binary_size(spec, "inputs[0].")
    if size is None:
        if "data" not in spec:
            raise bad_request(f"input '{spec.get('name')}' has neither 'data' nor binary data")
        if not isinstance(spec["data"], list):
            raise bad_request(f"inputs[0].data must be a list, got {_show(spec['data'])}")
        return None
    if "data" in spec:
        raise bad_request(f"input '{spec.get('name')}' has both 'data' and binary_data_size")
    return blob[:size]  # the only input, so its bytes are the whole blob (checked in _split)


def split_bytes(raw: bytes, count: int) -> list[bytes]:
    """Split a binary BYTES tensor (uint32 little-endian length, then the bytes, per element)
    into its `count` elements."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad_request("BYTES tensor ends inside an element's 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad_request(f"BYTES element {len(elements)} claims {length} bytes past the end")
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise bad_request(f"BYTES tensor holds {len(elements)} elements but its shape says {count}")
    return elements


def _json_bytes(spec: dict[str, Any], count: int) -> list[bytes]:
    # JSON strings cannot carry raw JPEG bytes (not UTF-8), so each element is base64.
    data = _flat(spec["data"])
    if len(data) != count:
        raise bad_request(
            f"inputs[0].data holds {len(data)} elements but inputs[0].shape says {count}"
        )
    images = []
    for index, item in enumerate(data):
        try:
            if not isinstance(item, str):
                raise ValueError
            images.append(base64.b64decode(item, validate=True))
        except (ValueError, binascii.Error):
            raise bad_request(
                f"inputs[0].data[{index}] of '{BYTES_INPUT}' in JSON must be a base64 string "
                f"of the encoded image (or send it as binary data), got {_show(item)}"
            ) from None
    return images


def _fp32_values(raw: bytes | None, spec: dict[str, Any], count: int) -> np.ndarray:
    if raw is not None:
        if len(raw) != 4 * count:
            raise bad_request(
                f"FP32 tensor of {count} elements needs {4 * count} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    try:
        # No dtype: a null, boolean or string among the numbers shows as a non-numeric
        # array kind rather than being coerced to nan, 1.0 or a parse error.
        parsed = np.asarray(spec["data"])
    except (ValueError, TypeError):  # ragged nesting
        parsed = np.asarray(None)
    if parsed.dtype.kind not in "iuf":
        raise bad_request("inputs[0].data of FP32 must be numbers (a flat or nested list)")
    values = parsed.astype(np.float32).reshape(-1)
    if values.size != count:
        raise bad_request(
            f"inputs[0].data holds {values.size} numbers but inputs[0].shape says {count}"
        )
    return values


def _flat(data: Any) -> list[Any]:
    """Return the elements of a flat or nested JSON list, in order (a scalar is one)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _requested_outputs(header: dict[str, Any]) -> list[RequestedOutput]:
    binary_default = _flag(_parameters(header, ""), "binary_data_output", False, "")
    specs = header.get("outputs")
    if specs is None:
        return [RequestedOutput(name, binary_default, 0) for name in OUTPUTS]
    if not isinstance(specs, list) or not specs:
        raise bad_request(f"'outputs' must be a non-empty list of {', '.join(OUTPUTS)}")
    outputs = []
    for index, spec in enumerate(specs):
        where = f"outputs[{index}]"
        if not isinstance(spec, dict):
            raise bad_request(f"{where} must be an object, got {_show(spec)}")
        name = spec.get("name")
        if name not in OUTPUTS:
            raise bad_request(
                f"unknown output {name!r} at {where}.name; this model has {', '.join(OUTPUTS)}"
            )
        options = _parameters(spec, f"{where}.")
        k = options.get("classification", 0)
        if not _is_int(k) or k < 0:
            raise bad_request(
                f"{where}.parameters.classification must be a non-negative integer, got {_show(k)}"
            )
        if k and name != "logits":
            raise bad_request("classification is only meaningful on the 'logits' output")
        binary = _flag(options, "binary_data", binary_default, f"{where}.")
        outputs.append(RequestedOutput(name, binary, k))
    return outputs


def serialize_bytes(elements: list[bytes]) -> bytes:
    """Encode BYTES elements as length-prefixed (uint32 little-endian) binary tensor data."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def encode_response(head: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """Return the response body and, when binary tensors follow the JSON, the header's length."""
    tensors, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if isinstance(out.values, np.ndarray):
            raw = out.values.astype("<f4").tobytes() if out.binary else b""
            data: Any = out.values.reshape(-1)
        else:
            raw = serialize_bytes(out.values) if out.binary else b""
            data = [e.decode() for e in out.values]
        if out.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = data
        tensors.append(entry)
    header = orjson.dumps(head | {"outputs": tensors}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
