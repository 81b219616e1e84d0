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
    """Split the body, validate the one input tensor and the requested outputs."""
    header, blob = _split(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(
            f"'inputs' must hold exactly one tensor: '{BYTES_INPUT}' (BYTES, encoded images) "
            f"or '{PIXELS_INPUT}' (FP32 [B, 3, H, W] preprocessed pixels)"
        )
    spec = inputs[0]
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad_request(f"input '{name}' needs 'shape', a list of non-negative integers")
    count = math.prod(shape)
    raw = _binary_part(spec, blob)
    images: list[bytes] | None = None
    pixels: np.ndarray | None = None
    if name == BYTES_INPUT and datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise bad_request(f"'{BYTES_INPUT}' has shape [B] or [B, 1], got {shape}")
        images = _bytes_elements(raw, count) if raw is not None else _json_bytes(spec, count)
    elif name == PIXELS_INPUT and datatype == "FP32":
        values = _fp32_values(raw, spec, count)
        pixels = values.reshape(shape)
    else:
        raise bad_request(
            f"unknown input '{name}' ({datatype}); this model takes '{BYTES_INPUT}' (BYTES) "
            f"or '{PIXELS_INPUT}' (FP32)"
        )
    if count == 0:
        raise bad_request(f"input '{name}' is empty (shape {shape})")
    request_id = header.get("id")
    return InferRequest(
        id=str(request_id) if request_id is not None else None,
        input_name=name,
        images=images,
        pixels=pixels,
        outputs=_requested_outputs(header),
    )


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, blob = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
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
    declared = sum(_binary_size(spec) or 0 for spec in header.get("inputs") or [])
    if declared != len(blob):
        raise bad_request(
            f"binary tensors declare {declared} bytes (binary_data_size) but {len(blob)} "
            "follow the header"
        )
    return header, blob


def _binary_size(spec: Any) -> int | None:
    params = spec.get("parameters") if isinstance(spec, dict) else None
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None and (not isinstance(size, int) or size < 0):
        raise bad_request(f"binary_data_size must be a non-negative integer, got {size!r}")
    return size


def _binary_part(spec: dict[str, Any], blob: bytes) -> bytes | None:
    size = _binary_size(spec)
    if size is None:
        if "data" not in spec:
            raise bad_request(f"input '{spec.get('name')}' has neither 'data' nor binary data")
        return None
    if "data" in spec:
        raise bad_request(f"input '{spec.get('name')}' has both 'data' and binary_data_size")
    return blob[:size]  # the only input, so its bytes are the whole blob (checked in _split)


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
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
    data = np.asarray(spec["data"], dtype=object).reshape(-1).tolist()
    if len(data) != count:
        raise bad_request(f"'data' holds {len(data)} elements but the shape says {count}")
    images = []
    for index, item in enumerate(data):
        try:
            if not isinstance(item, str):
                raise ValueError
            images.append(base64.b64decode(item, validate=True))
        except (ValueError, binascii.Error):
            raise bad_request(
                f"'{BYTES_INPUT}' element {index} in JSON must be a base64 string of the "
                "encoded image (or send it as binary data)"
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
        values = np.asarray(spec["data"], dtype=np.float32).reshape(-1)
    except (ValueError, TypeError):
        raise bad_request("FP32 'data' must be numbers (a flat or nested list)") from None
    if values.size != count:
        raise bad_request(f"'data' holds {values.size} numbers but the shape says {count}")
    return values


def _requested_outputs(header: dict[str, Any]) -> list[RequestedOutput]:
    params = header.get("parameters") or {}
    binary_default = (
        bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    )
    specs = header.get("outputs")
    if specs is None:
        return [RequestedOutput(name, binary_default, 0) for name in OUTPUTS]
    if not isinstance(specs, list) or not specs:
        raise bad_request(f"'outputs' must be a non-empty list of {', '.join(OUTPUTS)}")
    outputs = []
    for spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OUTPUTS:
            raise bad_request(f"unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
        options = spec.get("parameters") or {}
        k = options.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise bad_request(f"classification must be a non-negative integer, got {k!r}")
        if k and name != "logits":
            raise bad_request("classification is only meaningful on the 'logits' output")
        outputs.append(RequestedOutput(name, bool(options.get("binary_data", binary_default)), k))
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
