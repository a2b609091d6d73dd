"""The Open Inference Protocol (KServe v2) REST endpoints (docs/oip.md): health, server and model
metadata, and infer. Infer parses the tensors into images, then goes through the same handler and
batcher as /v1/detect, so both give the same verdict for the same image."""

import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.core.bundle import Bundle
from service.core.images import ImageError, from_array
from service.serve import handler, oip
from service.serve.errors import ServiceError, bad_request
from service.serve.oip import Tensor
from service.serve.schemas import OIP_BOOLEAN, OIP_ERRORS, OIP_INFER, OIP_INFERRED, OipModelMetadata, OipServerMetadata
from service.serve.state import Served, State, StateDep
from service.serve.uploads import check_count, decode_all, read_body

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
OUTPUTS = {  # name -> (datatype, shown only when details are exposed)
    "predicted_class": ("INT64", False),
    "is_adversarial": ("BOOL", False),
    "p_value": ("FP64", True),
    "instance_score": ("FP64", True),
}
DEFAULT_OUTPUTS = ("predicted_class", "is_adversarial", "p_value", "instance_score")
IMAGES, PIXELS = "images", "pixels"
EXTENSIONS = ["binary_tensor_data", "parameters"]


def _model(state: State, name: str, version: str | None) -> Served:
    """The served model named `name` (at `version`, when given), else 404 naming what is served."""
    return _at_version(state.model(name), version)


def _at_version(served: Served, version: str | None) -> Served:
    if version is not None and version != str(served.bundle.card["version"]):
        raise ServiceError(
            404, "not_found", f"model {served.name!r} has no version {version!r}; it serves {[str(served.bundle.card['version'])]}"
        )
    return served


def metadata(bundle: Bundle, shown: bool) -> dict[str, Any]:
    """Model metadata: the two input forms (send one of them) and every output this client may ask for."""
    c, h, w = bundle.input_shape
    outputs = [{"name": k, "datatype": d, "shape": [-1]} for k, (d, detail) in OUTPUTS.items() if shown or not detail]
    outputs += [{"name": k, "datatype": "FP64", "shape": [-1]} for k in bundle.scores] if shown else []
    return {
        "name": bundle.name,
        "versions": [str(bundle.card["version"])],
        "platform": "fisherguard",
        "inputs": [
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "FP32", "shape": [-1, c, h, w]},
        ],
        "outputs": outputs,
        "parameters": {"classes": list(bundle.classes), "pixels": "FP32 in [0, 1] or UINT8, channel-first; or images: encoded files"},
    }


@router.get("/health/live", response_class=Response, responses={200: OIP_BOOLEAN[200]})
async def live() -> Response:
    """Liveness (empty body; 200 means live)."""
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=OIP_BOOLEAN)
async def ready(state: StateDep) -> Response:
    """Readiness (empty body): 200 when the model serves, 400 otherwise, as the protocol says."""
    return Response(status_code=200 if state.ready else 400)


@router.get("", response_model=OipServerMetadata)
async def server_metadata() -> dict[str, Any]:
    return {"name": "fisherguard", "version": __version__, "extensions": EXTENSIONS}


@router.get("/models/{model_name}", response_model=OipModelMetadata, responses=OIP_ERRORS)
async def model_metadata(request: Request, state: StateDep, model_name: str) -> dict[str, Any]:
    return metadata(_model(state, model_name, None).bundle, handler.shows_details(request, state))


@router.get("/models/{model_name}/versions/{model_version}", response_model=OipModelMetadata, responses=OIP_ERRORS)
async def version_metadata(request: Request, state: StateDep, model_name: str, model_version: str) -> dict[str, Any]:
    return metadata(_model(state, model_name, model_version).bundle, handler.shows_details(request, state))


@router.get("/models/{model_name}/ready", response_class=Response, responses=OIP_BOOLEAN | OIP_ERRORS)
async def model_ready(state: StateDep, model_name: str) -> Response:
    return _ready(state, _model(state, model_name, None))


@router.get("/models/{model_name}/versions/{model_version}/ready", response_class=Response, responses=OIP_BOOLEAN | OIP_ERRORS)
async def version_ready(state: StateDep, model_name: str, model_version: str) -> Response:
    return _ready(state, _model(state, model_name, model_version))


def _ready(state: State, served: Served) -> Response:
    return Response(status_code=200 if served.ready and not state.closing else 400)


def _alpha(parameters: dict[str, Any]) -> float | None:
    a = parameters.get("alpha")
    if a is not None and (isinstance(a, bool) or not isinstance(a, int | float)):
        raise bad_request(f"parameters.alpha must be a number, got {a!r}")
    return None if a is None else float(a)


def _timeout_ms(parameters: dict[str, Any]) -> float | None:
    """The request's `timeout` parameter, in microseconds as Triton's clients send it."""
    us = parameters.get("timeout")
    if us is None:
        return None
    if isinstance(us, bool) or not isinstance(us, int | float) or us <= 0:
        raise bad_request(f"parameters.timeout must be a positive number of microseconds, got {us!r}")
    return float(us) / 1000


def _outputs(request: oip.InferRequest, shown: bool, bundle: Bundle) -> list[oip.Requested]:
    """The outputs asked for (the defaults when none are), each known and allowed to this client."""

    def detail(name: str) -> bool:
        return name in bundle.scores or OUTPUTS[name][1]

    if request.outputs is None:
        return [oip.Requested(k, request.binary_default) for k in DEFAULT_OUTPUTS if shown or not detail(k)]
    for o in request.outputs:
        if o.name not in OUTPUTS and o.name not in bundle.scores:
            raise bad_request(f"unknown output {o.name!r}; known: {[*OUTPUTS, *bundle.scores]}")
        if not shown and detail(o.name):
            raise ServiceError(403, "forbidden", f"this client gets the verdict only, not {o.name!r} (disclosure level verdict)")
    return request.outputs


def _pixels(t: Tensor, bundle: Bundle) -> list[torch.Tensor]:
    """FP32 in [0, 1] or UINT8 [N, C, H, W] in the card's layout -> N tensors (C, H, W)."""
    try:
        x = from_array(t.data, t.datatype, bundle.input_shape)
    except ImageError as e:
        raise bad_request(f"input {PIXELS!r}: {e.message} ({bundle.name}'s input)") from None
    return list(x.unbind(0))


async def _images(t: Tensor, state: State, bundle: Bundle) -> list[torch.Tensor]:
    """The request's one input tensor as images (C, H, W), converted or decoded in the threadpool (the
    event loop runs no tensor work); any bad image refuses the request, naming it."""
    s = state.settings
    if t.name == PIXELS:
        return await run_in_threadpool(_pixels, t, bundle)
    if t.name != IMAGES:
        raise bad_request(f"unknown input {t.name!r}; send one of {[IMAGES, PIXELS]}")
    if t.datatype != "BYTES" or not isinstance(t.data, list):
        raise bad_request(f"input {IMAGES!r}: datatype {t.datatype} is not BYTES (encoded image files)")
    if not t.data:
        raise bad_request(f"input {IMAGES!r} holds no images")
    decoded = await decode_all([(None, b) for b in t.data], bundle, s)
    for i, x in enumerate(decoded):
        if isinstance(x, ServiceError):
            raise ServiceError(x.status, x.code, f"image {i}: {x.message}")
    return [x for x in decoded if isinstance(x, torch.Tensor)]


def _column(name: str, datatype: str, values: list[Any]) -> Tensor:
    return Tensor(name, datatype, (len(values),), np.asarray(values, dtype=oip.NUMPY[datatype]))


@router.post("/models/{model_name}/infer", responses=OIP_INFERRED, openapi_extra=OIP_INFER)
async def infer(request: Request, state: StateDep, model_name: str) -> Response:
    return await _infer(request, state, model_name, None)


@router.post("/models/{model_name}/versions/{model_version}/infer", responses=OIP_INFERRED, openapi_extra=OIP_INFER)
async def infer_version(request: Request, state: StateDep, model_name: str, model_version: str) -> Response:
    return await _infer(request, state, model_name, model_version)


async def _infer(request: Request, state: State, model_name: str, model_version: str | None) -> Response:
    t0 = time.monotonic()
    served, held = handler.admitted(request, state, model_name)  # with room for its first image
    bundle = _at_version(served, model_version).bundle
    state.check_ready()
    body = await read_body(request, state.settings.max_body_bytes, state.settings.body_timeout_ms)
    req = await run_in_threadpool(oip.parse_request, body, request.headers.get(oip.HEADER))  # JSON and arrays: off the event loop
    if len(req.inputs) != 1:
        raise bad_request(f"send exactly one input ({IMAGES!r} or {PIXELS!r}), got {[t.name for t in req.inputs]}")
    full = handler.shows_details(request, state)
    wanted = _outputs(req, full, bundle)
    scores = ",".join(o.name for o in wanted if o.name in bundle.scores) or None
    spec = handler.ask(state, served, scores, None, _alpha(req.parameters), _timeout_ms(req.parameters), t0, full=full)
    n = len(req.inputs[0].data)
    check_count(n, state.settings)
    handler.charge_images(request, state, n)
    if n > held.images:
        held.extend(n - held.images)  # before decoding: a request the queue cannot take is refused now
    with state.tracing.span("decode", images=n):
        images = await _images(req.inputs[0], state, bundle)
    outcomes, _ = await handler.run(served, request, list(images), spec, held)
    judged = []
    for i, o in enumerate(outcomes):
        if isinstance(o, ServiceError):
            raise ServiceError(o.status, o.code, f"image {i}: {o.message}", o.retry_after)
        judged.append(handler.judge(state, served, o, spec))
        handler.watch(request, state, images[i], judged[-1].flagged)
    columns: dict[str, tuple[str, list[Any]]] = {
        "predicted_class": ("INT64", [j.result.predicted for j in judged]),
        "is_adversarial": ("BOOL", [j.flagged for j in judged]),
        "p_value": ("FP64", [j.p_value for j in judged]),
        "instance_score": ("FP64", [j.statistic for j in judged]),
    }
    columns |= {k: ("FP64", [j.result.scores[k] for j in judged]) for k in bundle.scores if k in spec.scores}
    out = [(_column(o.name, *columns[o.name]), o.binary) for o in wanted]
    head: dict[str, Any] = {"model_name": bundle.name, "model_version": str(bundle.card["version"])}
    head |= ({"id": req.id} if req.id is not None else {}) | {"parameters": {"alpha": spec.alpha}}
    content, json_length = oip.encode_response(head, out)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(json_length)})
