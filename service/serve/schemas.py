"""Response shapes of the HTTP API (docs/api.md), for validation and the OpenAPI page."""

from typing import Any, Literal

from pydantic import BaseModel


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelRef(BaseModel):
    name: str
    version: str
    device: str


class Decision(BaseModel):
    statistic: str
    tail: Literal["one-sided", "two-sided"]
    components: list[dict[str, str]] | None = None  # a combined decision's scores and tails
    p_value: float | None = None  # absent at disclosure level verdict
    alpha: float
    flagged: bool


class Heatmap(BaseModel):
    png_base64: str
    shape: list[int]
    min: float
    max: float


class ImageVerdict(BaseModel):
    index: int
    filename: str | None
    status: Literal["ok", "error"]
    predicted_class: int | None = None
    label: str | None = None
    confidence: float | None = None
    scores: dict[str, float] | None = None
    p_values: dict[str, float] | None = None
    decision: Decision | None = None
    heatmaps: dict[str, Heatmap] | None = None
    error: ErrorBody | None = None


class Timing(BaseModel):
    queue: float
    compute: float
    total: float


class DetectResponse(BaseModel):
    model: ModelRef
    results: list[ImageVerdict]
    timing_ms: Timing | None = None  # absent at disclosure level verdict


ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 403, 408, 413, 415, 422, 429, 503)}
ERRORS_404: dict[int | str, dict[str, Any]] = {**ERRORS, 404: {"model": ErrorResponse}}  # routes that name a model
IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}
            },
        },
    }
}


# The Open Inference Protocol's shapes (docs/oip.md)
class OipError(BaseModel):
    error: str
    code: str


class OipTensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OipServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]
    parameters: dict[str, Any]


class OipTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class OipRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class OipInferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[OipTensor]
    outputs: list[OipRequestedOutput] | None = None


class OipInferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[OipTensor]


OIP_ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": OipError} for c in (400, 401, 403, 404, 408, 413, 422, 429, 503)}
OIP_BOOLEAN: dict[int | str, dict[str, Any]] = {  # the protocol's health and readiness: the status is the answer
    200: {"description": "true (empty body)", "content": {}},
    400: {"description": "false (empty body)", "content": {}},
}
BINARY = {"schema": {"type": "string", "format": "binary"}}
OIP_INFER: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": OipInferRequest.model_json_schema()}, "application/octet-stream": BINARY},
    }
}
OIP_INFERRED: dict[int | str, dict[str, Any]] = {
    200: {"model": OipInferResponse, "content": {"application/octet-stream": BINARY}, "description": "the verdicts"},
    **OIP_ERRORS,
}
