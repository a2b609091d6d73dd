"""The Open Inference Protocol's (KServe v2) REST wire format, with its binary tensor extension
(docs/oip.md): parsing an infer request into tensors and writing an infer response. Pure functions
on bytes and numpy arrays; the routes in `routes/oip.py` use them, the handler decides.

A body is JSON, or — with the `Inference-Header-Content-Length: L` header — L bytes of JSON followed
by the binary data of the tensors whose `parameters.binary_data_size` says how many bytes they take,
in the order they appear. BYTES elements in binary are each a 4-byte little-endian length and the
bytes; in JSON, a BYTES element is a string (base64 for the `images` input: images are not text).
"""

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.serve.errors import bad_request

NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
HEADER = "inference-header-content-length"


@dataclass(frozen=True)
class Tensor:
    """One named tensor: numeric data as an array of `shape`, BYTES data as a flat list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


@dataclass(frozen=True)
class Requested:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[Tensor]
    outputs: list[Requested] | None  # None: the model's default outputs
    binary_default: bool  # the request's `binary_data_output`


def _object(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise bad_request(f"{what} must be a JSON object, got {type(raw).__name__}")
    return raw


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise bad_request(f"input {name!r}: shape must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary rest of a body (empty without the extension)."""
    if header_length is None:
        n = len(body)
    elif not header_length.isdigit() or int(header_length) > len(body):
        raise bad_request(f"Inference-Header-Content-Length {header_length!r} is not a length within the {len(body)}-byte body")
    else:
        n = int(header_length)
    try:
        header = json.loads(body[:n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request's JSON is malformed: {e}") from None
    return _object(header, "the request"), memoryview(body)[n:]


def bytes_elements(buf: memoryview, name: str) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then that many bytes."""
    out, at = [], 0
    while at < len(buf):
        if at + 4 > len(buf):
            raise bad_request(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", buf, at)
        if at + 4 + n > len(buf):
            raise bad_request(f"input {name!r}: a BYTES element claims {n} bytes, {len(buf) - at - 4} remain")
        out.append(bytes(buf[at + 4 : at + 4 + n]))
        at += 4 + n
    return out


def _json_bytes(data: list[Any], name: str) -> list[bytes]:
    out = []
    for i, d in enumerate(data):
        if not isinstance(d, str):
            raise bad_request(f"input {name!r}: BYTES element {i} must be a base64 string, got {type(d).__name__}")
        try:
            out.append(base64.b64decode(d, validate=True))
        except binascii.Error:
            raise bad_request(f"input {name!r}: BYTES element {i} is not base64 ({d[:20]!r}...)") from None
    return out


def _flat(data: Any) -> list[Any]:
    """The row-major flattening of a (possibly nested) JSON list."""
    if not isinstance(data, list):
        return [data]
    return [x for d in data for x in _flat(d)]


def parse_tensor(spec: dict[str, Any], rest: memoryview, at: int) -> tuple[Tensor, int]:
    """One input tensor from its JSON spec, its data from JSON or from `rest` at offset `at`; also the next offset."""
    name, datatype = spec.get("name"), spec.get("datatype")
    if not isinstance(name, str):
        raise bad_request(f"an input has no string name: {str(spec)[:80]}")
    if datatype != "BYTES" and datatype not in NUMPY:
        raise bad_request(f"input {name!r}: datatype {datatype!r} is not one of {['BYTES', *NUMPY]}")
    shape = _shape(spec.get("shape"), name)
    size = math.prod(shape)
    params = _object(spec.get("parameters") or {}, f"input {name!r} parameters")
    binary_size = params.get("binary_data_size")
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size < 0 or at + binary_size > len(rest):
            raise bad_request(f"input {name!r}: binary_data_size {binary_size!r} does not fit the {len(rest) - at} binary bytes left")
        buf, at = rest[at : at + binary_size], at + binary_size
        if datatype == "BYTES":
            data: np.ndarray | list[bytes] = bytes_elements(buf, name)
        else:
            dtype = NUMPY[datatype]
            if len(buf) != size * dtype.itemsize:
                raise bad_request(f"input {name!r}: {len(buf)} bytes of {datatype} do not make shape {list(shape)}")
            data = np.frombuffer(buf, dtype=dtype).reshape(shape)
    elif "data" in spec:
        if datatype == "BYTES":
            data = _json_bytes(_flat(spec["data"]), name)
        else:
            try:  # flat or nested, row-major
                data = np.asarray(spec["data"], dtype=NUMPY[datatype]).reshape(-1)
            except (TypeError, ValueError, OverflowError) as e:
                raise bad_request(f"input {name!r}: data is not {datatype}: {e}") from None
            if data.size != size:
                raise bad_request(f"input {name!r}: {data.size} values do not make shape {list(shape)}")
            data = data.reshape(shape)
    else:
        raise bad_request(f"input {name!r} has neither data nor parameters.binary_data_size")
    if isinstance(data, list) and len(data) != size:
        raise bad_request(f"input {name!r}: {len(data)} BYTES elements do not make shape {list(shape)}")
    return Tensor(name, datatype, shape, data), at


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    header, rest = split_body(body, header_length)
    inputs_raw = header.get("inputs")
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise bad_request("the request needs a non-empty list of inputs")
    inputs, at = [], 0
    for spec in inputs_raw:
        tensor, at = parse_tensor(_object(spec, "an input"), rest, at)
        inputs.append(tensor)
    if at != len(rest):
        raise bad_request(f"{len(rest) - at} bytes of binary data follow the inputs that claim them")
    parameters = _object(header.get("parameters") or {}, "the request's parameters")
    outputs = None
    if header.get("outputs") is not None:
        if not isinstance(header["outputs"], list):
            raise bad_request("outputs must be a list")
        outputs = []
        for o in header["outputs"]:
            o = _object(o, "an output")
            if not isinstance(o.get("name"), str):
                raise bad_request(f"a requested output has no string name: {str(o)[:80]}")
            binary = _object(o.get("parameters") or {}, f"output {o['name']!r} parameters").get("binary_data")
            outputs.append(Requested(o["name"], bool(binary) if binary is not None else bool(parameters.get("binary_data_output"))))
    rid = header.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad_request(f"id must be a string, got {rid!r}")
    return InferRequest(rid, parameters, inputs, outputs, bool(parameters.get("binary_data_output", False)))


def _binary(t: Tensor) -> bytes:
    if isinstance(t.data, list):
        return b"".join(struct.pack("<I", len(b)) + b for b in t.data)
    return np.ascontiguousarray(t.data, dtype=NUMPY[t.datatype]).tobytes()


def _json_data(t: Tensor) -> list[Any]:
    if isinstance(t.data, list):
        return [base64.b64encode(b).decode() for b in t.data]
    return t.data.reshape(-1).tolist()


def encode_response(head: dict[str, Any], outputs: list[tuple[Tensor, bool]]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header."""
    specs, blobs = [], []
    for t, binary in outputs:
        spec: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary:
            blob = _binary(t)
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = _json_data(t)
        specs.append(spec)
    text = json.dumps({**head, "outputs": specs}, separators=(",", ":")).encode()
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)
