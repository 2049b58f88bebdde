"""Request and response schemas: steward's JSON (`/predict`) and the Open Inference Protocol (KServe v2).

Bodies are parsed here by hand (size, UTF-8, JSON) so every bad request becomes a 4xx naming the field, never a
500; the model-specific checks (shape, type, NaN) happen where the instances are encoded.
"""

import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.requests import ClientDisconnect

from steward.data.encode import as_numbers

Attribute = str | int | float | bool | None
# Attribute values become group keys in the monitor's persisted state and Prometheus labels: kept short.
MAX_ATTRIBUTE_CHARS = 128
INTEGERS = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
NUMERIC = {*INTEGERS, "FP16", "FP32", "FP64"}
OUTPUTS = ("probabilities", "class_id", "label")


class BadRequest(Exception):
    """A request the server refuses: HTTP status, the field at fault, and what to do."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None):
        # A field can be a key the client sent, and a message can quote one: a lone surrogate in it would make the
        # reply unencodable (a 500), so it is kept escaped, as JSON would write it.
        field, message = utf8_safe(field), utf8_safe(message)
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message
        self.headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        self.headers.update(headers or {})

    def body(self) -> dict:
        return {"error": f"{self.field}: {self.message}", "field": self.field}


def utf8_safe(text: str) -> str:
    """`text` with every lone surrogate (which no UTF-8 text can hold) as its escape, \\udXXX."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(Strict):
    instances: list[Any] = Field(min_length=1, description="Raw inputs: strings (text) or nested number arrays.")
    attributes: dict[str, list[Attribute]] = Field(
        default_factory=dict, description="Optional per-instance metadata, e.g. a group column: one value each."
    )

    @field_validator("attributes")
    @classmethod
    def _one_value_per_instance(cls, value: dict[str, list[Attribute]], info: ValidationInfo) -> dict:
        count = len(info.data.get("instances") or [])
        for name, values in value.items():
            if len(values) != count:
                raise ValueError(f"attributes.{name} has {len(values)} values for {count} instances; give one each")
        return value


class FeedbackRequest(Strict):
    request_id: str = Field(min_length=1, max_length=128, description="`request_id` of an earlier prediction.")
    label: str = Field(min_length=1, max_length=256, description="The true class name, known only later.")


class Prediction(Strict):
    request_id: str = Field(description="Unique id of this instance's prediction (logged with the request).")
    label: str = Field(description="Predicted class name.")
    class_id: int = Field(description="Predicted class index into `labels`.")
    probabilities: list[float] = Field(description="Class probabilities, in the order of `labels`.")


class PredictResponse(Strict):
    model: str
    model_version: str
    labels: list[str]
    predictions: list[Prediction]


class InferTensor(Strict):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None  # None when the tensor's values come as binary data (oip_binary)


class RequestedOutput(Strict):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(Strict):
    model_name: str | None = None  # KServe's SDK sends it in the body as well as in the path
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None

    @field_validator("id")
    @classmethod
    def _echoable(cls, value: str | None) -> str | None:
        # the reply carries the id back: text that no UTF-8 reply can hold is refused here rather than at the reply
        if value is not None and utf8_safe(value) != value:
            raise ValueError("not valid UTF-8 (lone surrogate escape)")
        return value


class InferResponse(Strict):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] | None = None
    outputs: list[InferTensor]


class TensorMetadata(Strict):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(Strict):
    name: str
    versions: list[str]
    platform: Literal["pytorch"] = "pytorch"
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


def json_response(reply: BaseModel) -> Response:
    """A reply serialized once by pydantic-core (FastAPI would validate a returned model again first)."""
    return Response(reply.model_dump_json(exclude_none=True), media_type="application/json")


async def read_body(request: Request, limit: int, what: str = "serve.max_body_bytes") -> bytes:
    """The body, refused (413 naming `what`, the limit's setting) once it passes `limit`, before it is all read; a
    client that goes away before sending it all gets a 400 (answered to nobody, logged as one line)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "body", f"{declared} bytes is over the {limit}-byte limit ({what})")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, "body", f"over the {limit}-byte limit ({what})")
            chunks.append(chunk)
    except ClientDisconnect:  # e.g. a Content-Length that promised more than came: one log line, not a traceback
        raise BadRequest(400, "body", "the connection closed before the whole body came; send all of it") from None
    return b"".join(chunks)


def parse_body(raw: bytes, max_bytes: int) -> Any:
    """JSON from a request body; BadRequest for oversize (413), non-UTF-8 or malformed JSON (400)."""
    if len(raw) > max_bytes:
        raise BadRequest(413, "body", f"{len(raw)} bytes is over the {max_bytes}-byte limit (serve.max_body_bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(400, "body", f"not valid UTF-8 (byte {err.start}); send UTF-8 encoded JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRequest(400, "body", f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise BadRequest(400, "body", "JSON nested too deeply; flatten the body") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise BadRequest(400, "body", f"not valid JSON here: {err}") from None


def validated(schema: type[Strict], payload: Any) -> Any:
    """`payload` as `schema`, or BadRequest 422 naming the first field that is wrong."""
    try:
        return schema.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in first["loc"]).replace(".[", "[")
        raise BadRequest(422, field or "body", first["msg"].removeprefix("Value error, ")) from None


def check_attributes(attributes: dict[str, list[Attribute]]) -> None:
    """BadRequest 422 naming the first attribute name or value that could not be kept as a group key: text that is
    not valid UTF-8, longer than MAX_ATTRIBUTE_CHARS, or a number that is not finite or not an exact integer."""
    for name, values in attributes.items():
        if problem := _key_problem(name):
            raise BadRequest(422, "attributes", f"attribute name {problem}")
        for i, value in enumerate(values):
            if problem := _key_problem(value):
                raise BadRequest(422, f"attributes.{name}[{i}]", problem)


def _key_problem(value: Attribute) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number; send a string or a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return "an integer beyond 64 bits; send a string"
    if not isinstance(value, str):
        return None
    if len(value) > MAX_ATTRIBUTE_CHARS:
        return f"{len(value)} characters is over the limit of {MAX_ATTRIBUTE_CHARS}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8 (lone surrogate escape)"
    return None


def oip_instances(request: InferRequest, modality: str, input_shape: tuple[int, ...], data: Any = None) -> Any:
    """The one OIP input tensor as instances: a list of strings (BYTES [N]) or an array [N, *input_shape].

    `data`: the tensor's values when they came as binary data (`oip_binary.read_request`), else its JSON `data`.
    """
    tensor = request.inputs[0]
    values = tensor.data if data is None else data
    if values is None:
        raise BadRequest(422, "inputs[0].data", "missing; send `data`, or binary data (parameters.binary_data_size)")
    if modality == "text":
        if tensor.datatype != "BYTES":
            raise BadRequest(422, "inputs[0].datatype", f"text models take BYTES, got {tensor.datatype}")
        if len(tensor.shape) not in (1, 2) or math.prod(tensor.shape) != len(values):
            raise BadRequest(422, "inputs[0].shape", f"expected [N] matching {len(values)} strings")
        return list(values)
    if tensor.datatype not in NUMERIC:
        raise BadRequest(422, "inputs[0].datatype", f"expected a numeric datatype such as FP32, got {tensor.datatype}")
    if tuple(tensor.shape[1:]) != tuple(input_shape) or len(tensor.shape) != len(input_shape) + 1:
        expected = "[N, " + ", ".join(map(str, input_shape)) + "]"
        raise BadRequest(422, "inputs[0].shape", f"expected {expected}, got {tensor.shape}")
    try:
        numbers = as_numbers(values)
    except (TypeError, ValueError, OverflowError):
        numbers = None
    integers = tensor.datatype in INTEGERS
    if numbers is None or (integers and numbers.dtype.kind not in "iu"):
        kind = "integers" if integers else "numbers"
        raise BadRequest(422, "inputs[0].data", f"{tensor.datatype} takes {kind} (flat, row-major, or nested)")
    with np.errstate(over="ignore"):  # past float32's range becomes inf, refused with the instance's index later
        flat = numbers.astype(np.float32).reshape(-1)
    if flat.size != math.prod(tensor.shape):
        needed = math.prod(tensor.shape)
        raise BadRequest(422, "inputs[0].data", f"holds {flat.size} numbers, shape {tensor.shape} needs {needed}")
    return flat.reshape(tensor.shape)


def requested_outputs(request: InferRequest) -> list[str]:
    """The output tensors the request asks for (all of OUTPUTS when it names none); 422 naming an unknown one."""
    if not request.outputs:
        return list(OUTPUTS)
    for i, output in enumerate(request.outputs):
        if output.name not in OUTPUTS:
            raise BadRequest(422, f"outputs[{i}].name", f"no output {output.name!r}; outputs are {list(OUTPUTS)}")
    return [output.name for output in request.outputs]


def oip_outputs(probabilities: np.ndarray, labels: list[str], names: Sequence[str] = OUTPUTS) -> list[InferTensor]:
    """Those of probabilities FP32 [N, C], class ids INT64 [N] and labels BYTES [N] named, row-major flat data."""
    ids = probabilities.argmax(-1)
    n, c = probabilities.shape
    tensors = {
        "probabilities": lambda: InferTensor(
            name="probabilities", shape=[n, c], datatype="FP32", data=probabilities.reshape(-1).tolist()
        ),
        "class_id": lambda: InferTensor(name="class_id", shape=[n], datatype="INT64", data=ids.tolist()),
        "label": lambda: InferTensor(name="label", shape=[n], datatype="BYTES", data=[labels[i] for i in ids]),
    }
    return [tensors[name]() for name in names]
