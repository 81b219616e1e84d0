"""Seal a JSON document inside an artifact file, and read it back without loading the model.

The manifest's checksums protect the artifacts but not the manifest itself, and the manifest
is what says how to feed a model (input size, mean/std, crop) and how to read its answers
(dims, labels). So each artifact carries a copy of those fields in its own bytes, written
before its checksum is taken: ONNX in the model's `metadata_props`, TorchScript as an extra
file in its zip archive. Which fields, and how they are compared, is model.artifacts' job.

Reading is cheap on purpose (the service checks every artifact at start-up): the ONNX reader
walks the top-level protobuf fields and seeks past the graph instead of parsing it (a 360 MB
graph takes ~0.4 s and as much memory through `onnx.load`); the TorchScript reader opens one
zip entry.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Literal

ONNX_METADATA_KEY = "hiera_serve.contract"
TORCHSCRIPT_EXTRA_FILE = "hiera_serve.contract.json"

# ModelProto.metadata_props is field 14 (repeated StringStringEntryProto {key = 1; value = 2}).
_METADATA_PROPS = 14
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ContractUnreadable(ValueError):
    """An artifact whose sealed contract is absent, duplicated or not a JSON object."""


def canonical_json(document: dict[str, Any]) -> str:
    """Serialise with sorted keys and no spaces, so equal documents are equal strings."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)


def seal_onnx(path: Path, document: dict[str, Any]) -> None:
    """Write `document` into the ONNX model's metadata_props, replacing an earlier copy.

    Replacing matters: ONNX Runtime's quantizer copies the source graph's metadata into the
    int8 graph, which must carry its own contract, not the fp32 one.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != ONNX_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=canonical_json(document))
    onnx.save(model, str(path))


def torchscript_extra_files(document: dict[str, Any]) -> dict[str, str]:
    """Return the `_extra_files` mapping that seals `document` into a saved TorchScript."""
    return {TORCHSCRIPT_EXTRA_FILE: canonical_json(document)}


def read_sealed(path: Path, container: Literal["onnx", "torchscript"]) -> dict[str, Any] | None:
    """Return the document sealed in an ONNX or TorchScript file, or None if it has none."""
    text = _read_torchscript(path) if container == "torchscript" else _read_onnx(path)
    if text is None:
        return None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ContractUnreadable(f"{path.name}: its sealed contract is not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise ContractUnreadable(f"{path.name}: its sealed contract is not a JSON object")
    return document


def _read_torchscript(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        raise ContractUnreadable(f"{path.name} is not a TorchScript archive (not a zip file)")
    with zipfile.ZipFile(path) as archive:
        # torch.jit.save puts extra files under `<archive name>/extra/`.
        wanted = f"extra/{TORCHSCRIPT_EXTRA_FILE}"
        names = [n for n in archive.namelist() if n.partition("/")[2] == wanted]
        if len(names) > 1:
            raise ContractUnreadable(f"{path.name} holds {len(names)} sealed contracts")
        return archive.read(names[0]).decode("utf-8") if names else None


def _read_onnx(path: Path) -> str | None:
    found: list[str] = []
    with path.open("rb") as fh:
        size = path.stat().st_size
        while fh.tell() < size:
            field, wire = _split_tag(_varint(fh))
            if wire == _LEN:
                length = _varint(fh)
                if field == _METADATA_PROPS:
                    key, value = _string_pair(_read_exact(fh, length), path)
                    if key == ONNX_METADATA_KEY:
                        found.append(value)
                else:
                    fh.seek(length, 1)  # the graph, opsets, strings: skipped, never parsed
            else:
                _skip_scalar(fh, wire, path)
        if fh.tell() != size:
            raise ContractUnreadable(f"{path.name} is not a well-formed ONNX file")
    if len(found) > 1:
        raise ContractUnreadable(f"{path.name} holds {len(found)} sealed contracts")
    return found[0] if found else None


def _string_pair(entry: bytes, path: Path) -> tuple[str, str]:
    """Decode a StringStringEntryProto: field 1 is the key, field 2 the value."""
    strings = {1: "", 2: ""}
    pos = 0
    while pos < len(entry):
        tag, pos = _varint_at(entry, pos)
        field, wire = _split_tag(tag)
        if wire != _LEN:
            raise ContractUnreadable(f"{path.name}: malformed metadata entry")
        length, pos = _varint_at(entry, pos)
        if pos + length > len(entry):
            raise ContractUnreadable(f"{path.name}: truncated metadata entry")
        if field in strings:
            strings[field] = entry[pos : pos + length].decode("utf-8")
        pos += length
    return strings[1], strings[2]


def _split_tag(tag: int) -> tuple[int, int]:
    return tag >> 3, tag & 0x7


def _skip_scalar(fh: BinaryIO, wire: int, path: Path) -> None:
    if wire == _VARINT:
        _varint(fh)
    elif wire in (_I64, _I32):
        fh.seek(8 if wire == _I64 else 4, 1)
    else:  # groups (3, 4) are not used by ONNX; anything else is not protobuf
        raise ContractUnreadable(f"{path.name} is not a well-formed ONNX file (wire type {wire})")


def _varint(fh: BinaryIO) -> int:
    value, shift = 0, 0
    while True:
        byte = fh.read(1)
        if not byte or shift > 63:
            raise ContractUnreadable(f"{getattr(fh, 'name', 'file')}: truncated protobuf varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(data) and shift <= 63:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ContractUnreadable("truncated protobuf varint in a metadata entry")


def _read_exact(fh: BinaryIO, length: int) -> bytes:
    data = fh.read(length)
    if len(data) != length:
        raise ContractUnreadable(f"{getattr(fh, 'name', 'file')}: truncated metadata entry")
    return data
