"""The Open Inference Protocol's binary tensor data extension (KServe v2, Triton's `binary_tensor_data`).

A body with binary tensors is a JSON object of `Inference-Header-Content-Length` bytes, then the bytes of each tensor
whose parameters give a `binary_data_size`, in the order of the tensors: little-endian, row-major, no padding, a
BYTES element as a 4-byte little-endian length and then its bytes. `tritonclient.http` sends inputs this way and asks
for outputs this way by default; KServe's SDK sends inputs set with `set_data_from_numpy` this way. Every part that
does not add up is a BadRequest naming it, never a 500.
"""

import math
import re
import struct
from typing import Any

import numpy as np
from fastapi import Response

from steward.serve.protocol import (
    BadRequest,
    InferRequest,
    InferResponse,
    InferTensor,
    json_response,
    parse_body,
    validated,
)

HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)  # what GET /v2 advertises
# The binary form of each datatype with one (BF16 has no numpy type, and BYTES is length-prefixed).
DTYPES = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
# A byte count of at most 18 digits: Python refuses int() of very long digit strings, and no body is that large.
BYTE_COUNT = re.compile(r"[0-9]{1,18}")
# Parameters of extensions this server does not implement: refused, since ignoring them would answer another question.
UNSUPPORTED = ("shared_memory_region", "classification")
MISSING_HEADER = f"; binary data follows the JSON only when the request gives its length in {HEADER}"


def read_request(raw: bytes, declared: str | None, max_bytes: int) -> tuple[InferRequest, list[Any]]:
    """An OIP request body (JSON, or JSON then binary tensors; `declared`: its Inference-Header-Content-Length)
    -> the request and each input's values, for `oip_instances`."""
    header, tail = split_body(raw, declared)
    request = validated(InferRequest, parse_body(header, max_bytes))
    return request, input_values(request, tail)


def split_body(raw: bytes, declared: str | None) -> tuple[bytes, bytes]:
    """(JSON, binary tensor data) of a request body; all of it is JSON when no length is declared."""
    if declared is None:
        return raw, b""
    if not BYTE_COUNT.fullmatch(declared.strip()):
        raise BadRequest(400, HEADER, "not a byte count; send the length of the body's JSON part in bytes")
    length = int(declared)
    if length > len(raw):
        raise BadRequest(400, HEADER, f"{length} bytes of JSON, but the whole body is {len(raw)} bytes")
    return raw[:length], raw[length:]


def input_values(request: InferRequest, tail: bytes) -> list[Any]:
    """Each input's values: its JSON `data` (None when it has none), or its binary data decoded from `tail`
    (numbers as a flat numpy array, BYTES as strings); BadRequest when the binary data does not add up."""
    values, offset = [], 0
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}]"
        check_supported(tensor.parameters, field)
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            values.append(tensor.data)
            continue
        if tensor.data is not None:
            raise BadRequest(422, f"{field}.data", "given with parameters.binary_data_size; send one or the other")
        where = f"{field}.parameters.binary_data_size"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(422, where, "not a byte count; give the tensor's binary data length in bytes")
        if size > len(tail) - offset:
            left, hint = len(tail) - offset, "" if tail else MISSING_HEADER
            raise BadRequest(422, where, f"{size} bytes, but {left} bytes of binary data are left{hint}")
        values.append(decode_tensor(tensor, tail[offset : offset + size], field))
        offset += size
    if offset != len(tail):
        extra = len(tail) - offset
        raise BadRequest(400, "body", f"{extra} bytes after the JSON that no input's binary_data_size accounts for")
    return values


def decode_tensor(tensor: InferTensor, raw: bytes, field: str) -> Any:
    """One tensor's binary data: a flat numpy array of its datatype, or a list of strings for BYTES."""
    if any(dim < 0 for dim in tensor.shape):
        raise BadRequest(422, f"{field}.shape", f"{tensor.shape} has a negative dimension")
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        return decode_bytes(raw, count, field)
    if tensor.datatype not in DTYPES:
        kinds = ", ".join([*DTYPES, "BYTES"])
        raise BadRequest(422, f"{field}.datatype", f"no binary form for {tensor.datatype[:32]!r}; one of {kinds}")
    dtype = np.dtype(DTYPES[tensor.datatype])
    if len(raw) != count * dtype.itemsize:
        needs = f"{tensor.datatype} {tensor.shape} takes {count * dtype.itemsize}"
        raise BadRequest(422, f"{field}.parameters.binary_data_size", f"{len(raw)} bytes, but {needs}")
    return np.frombuffer(raw, dtype=dtype)  # flat: the caller checks the shape before it reshapes


def decode_bytes(raw: bytes, count: int, field: str) -> list[str]:
    """`count` BYTES elements, each a 4-byte little-endian length and then that many bytes of UTF-8 text."""
    texts: list[str] = []
    offset = 0
    while offset < len(raw):
        where = f"{field}.data[{len(texts)}]"
        if len(texts) == count:
            raise BadRequest(422, f"{field}.data", f"binary data holds more than the {count} elements of its shape")
        if offset + 4 > len(raw):
            raise BadRequest(422, where, f"its 4-byte length is cut off by the end of the tensor's {len(raw)} bytes")
        (length,) = struct.unpack_from("<I", raw, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset > len(raw):
            raise BadRequest(422, where, f"its length, {length} bytes, runs past the tensor's {len(raw)} bytes")
        try:
            texts.append(raw[start:offset].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(422, where, "not valid UTF-8; send text as UTF-8") from None
    if len(texts) != count:
        raise BadRequest(422, f"{field}.data", f"binary data holds {len(texts)} elements, its shape {count}")
    return texts


def check_supported(parameters: dict[str, Any] | None, field: str) -> None:
    for key in UNSUPPORTED:
        if key in (parameters or {}):
            raise BadRequest(422, f"{field}.parameters.{key}", f"not supported here (extensions: {list(EXTENSIONS)})")


def binary_outputs(request: InferRequest, names: list[str]) -> set[str]:
    """Those of the outputs `names` to send as binary data: the request's parameters.binary_data_output sets the
    default, an output's own parameters.binary_data overrides it."""
    default = _flag(request.parameters, "binary_data_output", "parameters")
    chosen = {name: default for name in names}
    for i, output in enumerate(request.outputs or []):
        check_supported(output.parameters, f"outputs[{i}]")
        flag = _flag(output.parameters, "binary_data", f"outputs[{i}].parameters")
        if flag is not None:
            chosen[output.name] = flag
    return {name for name, binary in chosen.items() if binary}


def _flag(parameters: dict[str, Any] | None, key: str, field: str) -> bool | None:
    value = (parameters or {}).get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(422, f"{field}.{key}", f"a {type(value).__name__}; send true or false")
    return value


def oip_reply(reply: InferResponse, binary: set[str]) -> Response:
    """`reply` as JSON, or, when outputs are to go as binary data, its JSON and then their bytes."""
    if not binary:
        return json_response(reply)
    chunks, outputs = [], []
    for tensor in reply.outputs:
        if tensor.name in binary:
            chunk = encode_tensor(tensor.datatype, tensor.data or [])
            parameters = {**(tensor.parameters or {}), "binary_data_size": len(chunk)}
            tensor = tensor.model_copy(update={"data": None, "parameters": parameters})
            chunks.append(chunk)
        outputs.append(tensor)
    header = reply.model_copy(update={"outputs": outputs}).model_dump_json(exclude_none=True).encode()
    body = b"".join([header, *chunks])
    return Response(body, media_type="application/octet-stream", headers={HEADER: str(len(header))})


def encode_tensor(datatype: str, data: list[Any]) -> bytes:
    """Flat tensor values in their binary form (BYTES: each element's UTF-8 after its 4-byte length)."""
    if datatype == "BYTES":
        elements = [value if isinstance(value, bytes) else str(value).encode() for value in data]
        return b"".join(struct.pack("<I", len(element)) + element for element in elements)
    return np.asarray(data, dtype=DTYPES[datatype]).tobytes()
