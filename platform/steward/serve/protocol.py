"""Request and response schemas: steward's JSON (`/predict`) and the Open Inference Protocol (KServe v2).

Bodies are parsed here by hand (size, UTF-8, JSON) so every bad request becomes a 4xx naming the field, never a
500; the model-specific checks (shape, type, NaN) happen where the instances are encoded.
"""

import json
import math
from typing import Any, Literal

import numpy as np
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

Attribute = str | int | float | bool | None
NUMERIC = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"}


class BadRequest(Exception):
    """A request the server refuses: HTTP status, the field at fault, and what to do."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": f"{self.field}: {self.message}", "field": self.field}


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
    data: list[Any]


class InferRequest(Strict):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1)
    outputs: list[dict[str, Any]] | None = None


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


def validated(schema: type[Strict], payload: Any) -> Any:
    """`payload` as `schema`, or BadRequest 422 naming the first field that is wrong."""
    try:
        return schema.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in first["loc"]).replace(".[", "[")
        raise BadRequest(422, field or "body", first["msg"].removeprefix("Value error, ")) from None


def oip_instances(request: InferRequest, modality: str, input_shape: tuple[int, ...]) -> Any:
    """The one OIP input tensor as instances: a list of strings (BYTES [N]) or an array [N, *input_shape]."""
    tensor = request.inputs[0]
    if modality == "text":
        if tensor.datatype != "BYTES":
            raise BadRequest(422, "inputs[0].datatype", f"text models take BYTES, got {tensor.datatype}")
        if len(tensor.shape) not in (1, 2) or math.prod(tensor.shape) != len(tensor.data):
            raise BadRequest(422, "inputs[0].shape", f"expected [N] matching {len(tensor.data)} strings")
        return tensor.data
    if tensor.datatype not in NUMERIC:
        raise BadRequest(422, "inputs[0].datatype", f"expected a numeric datatype such as FP32, got {tensor.datatype}")
    if tuple(tensor.shape[1:]) != tuple(input_shape) or len(tensor.shape) != len(input_shape) + 1:
        expected = "[N, " + ", ".join(map(str, input_shape)) + "]"
        raise BadRequest(422, "inputs[0].shape", f"expected {expected}, got {tensor.shape}")
    try:
        flat = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise BadRequest(422, "inputs[0].data", "expected numbers (flat, row-major, or nested)") from None
    if flat.size != math.prod(tensor.shape):
        needed = math.prod(tensor.shape)
        raise BadRequest(422, "inputs[0].data", f"holds {flat.size} numbers, shape {tensor.shape} needs {needed}")
    return flat.reshape(tensor.shape)


def oip_outputs(probabilities: np.ndarray, labels: list[str]) -> list[InferTensor]:
    """Probabilities FP32 [N, C], class ids INT64 [N] and labels BYTES [N], row-major flat data."""
    ids = probabilities.argmax(-1)
    n, c = probabilities.shape
    return [
        InferTensor(name="probabilities", shape=[n, c], datatype="FP32", data=probabilities.reshape(-1).tolist()),
        InferTensor(name="class_id", shape=[n], datatype="INT64", data=ids.tolist()),
        InferTensor(name="label", shape=[n], datatype="BYTES", data=[labels[i] for i in ids]),
    ]
