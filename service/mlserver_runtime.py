"""FisherGuard as an MLServer custom runtime (docs/serving-platforms.md#seldon-core-2): a bundle served by MLServer, so by
Seldon Core 2 as a `Model` on an MLServer `Server`, over MLServer's Open Inference Protocol REST and
gRPC endpoints and with its adaptive batching.

The same inputs and outputs as `fisherguard serve`'s /v2 (docs/oip.md), from the same core: images
decoded by `core.images` to the card's input, scored by `core.scoring.score`, judged by
`core.decision.decide` — so a verdict here equals the one /v1/detect gives for the same image. The
runtime imports `service.core` only; `mlserver` is not a dependency of the service (it pins an older
FastAPI) and is installed beside it in an MLServer image.

model-settings.json:

    {"name": "mnist", "implementation": "service.mlserver_runtime.FisherGuardRuntime",
     "parameters": {"uri": "./bundle", "extra": {"device": "cpu", "alpha": 0.05}},
     "max_batch_size": 32, "max_batch_time": 0.005}

`uri` is the bundle's directory, relative to the settings file (`./` when the bundle's files sit
beside it, as in a Seldon model artifact); `extra` optionally sets the device (`auto`) and the
default α (else the calibration's).
"""

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import Base64Codec, NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, ResponseOutput
from mlserver.utils import get_model_uri

from service.core import decision
from service.core.bundle import Bundle, load_bundle
from service.core.device import pick_device
from service.core.images import ImageError, decode, from_array
from service.core.scores import DEFAULT
from service.core.scoring import score

IMAGES, PIXELS = "images", "pixels"
OUTPUTS = {"predicted_class": "INT64", "is_adversarial": "BOOL", "p_value": "FP64", "instance_score": "FP64"}
MAX_PIXELS = 40_000_000  # per decoded image, as the service's default `max_image_pixels`
MAX_IMAGES = 64  # per request, as the service's default `max_images_per_request`


def images(files: Sequence[bytes], bundle: Bundle) -> torch.Tensor:
    """Encoded image files -> (N, C, H, W) as the card's input; a bad one refuses the request, naming it."""
    if not files:
        raise InferenceError(f"input {IMAGES!r} holds no images")
    out = []
    for i, data in enumerate(files):
        try:
            out.append(decode(data, bundle.input, MAX_PIXELS))
        except ImageError as e:
            raise InferenceError(f"image {i}: {e}") from e
    return torch.stack(out)


def alpha_of(parameters: Any, default: float) -> float:
    """The request's `alpha` parameter (0 < α < 1), else the default."""
    a = (getattr(parameters, "model_extra", None) or {}).get("alpha") if parameters is not None else None
    if a is None:
        return default
    if isinstance(a, bool) or not isinstance(a, int | float) or not 0 < a < 1:
        raise InferenceError(f"parameters.alpha must be a number in (0, 1), got {a!r}")
    return float(a)


class FisherGuardRuntime(MLModel):  # type: ignore[misc]
    """One bundle: loaded and warmed up in `load`, a batch of images judged per `predict`."""

    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        bundle = load_bundle(await get_model_uri(self.settings), pick_device(str(extra.get("device", "auto"))))
        if bundle.calibration is None:
            raise ValueError(f"bundle {bundle.path} has no calibration.json: run `fisherguard calibrate --model {bundle.path}`")
        self._bundle = bundle
        self._engine = asyncio.Lock()  # one batch on the model at a time, as the service's batcher thread does
        self._alpha = float(extra.get("alpha") or bundle.calibration.alpha)
        self._scores = tuple(dict.fromkeys((*DEFAULT, *bundle.calibration.decision_scores)))
        c, h, w = bundle.input_shape
        self.inputs = [
            MetadataTensor(name=IMAGES, datatype="BYTES", shape=[-1]),
            MetadataTensor(name=PIXELS, datatype="FP32", shape=[-1, c, h, w]),
        ]
        self.outputs = [MetadataTensor(name=k, datatype=d, shape=[-1]) for k, d in OUTPUTS.items()]
        self.outputs += [MetadataTensor(name=k, datatype="FP64", shape=[-1]) for k in bundle.scores]
        async with self._engine:
            await asyncio.to_thread(score, self._bundle, torch.zeros(1, c, h, w), self._scores)  # warm-up
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        bundle = self._bundle
        if len(payload.inputs) != 1:
            raise InferenceError(f"send exactly one input ({IMAGES!r} or {PIXELS!r}), got {[i.name for i in payload.inputs]}")
        inp = payload.inputs[0]
        limit = MAX_IMAGES * max(1, self.settings.max_batch_size)  # a request, or the requests MLServer merged
        if inp.shape and inp.shape[0] > limit:
            raise InferenceError(f"{inp.shape[0]} images in one call; at most {limit}")
        datatype = str(getattr(inp.datatype, "value", inp.datatype))  # an enum, or its value in a request MLServer merged
        if inp.name == PIXELS:
            try:
                x = from_array(NumpyCodec.decode_input(inp), datatype, bundle.input_shape)
            except ImageError as e:
                raise InferenceError(f"input {PIXELS!r}: {e}") from e
        elif inp.name == IMAGES and datatype == "BYTES":
            x = images(Base64Codec.decode_input(inp), bundle)
        else:
            raise InferenceError(
                f"send {IMAGES!r} (BYTES: encoded image files) or {PIXELS!r} (FP32/UINT8 [N, C, H, W]), got {inp.name!r} {datatype}"
            )
        wanted = [o.name for o in payload.outputs] if payload.outputs else list(OUTPUTS)
        unknown = [k for k in wanted if k not in OUTPUTS and k not in bundle.scores]
        if unknown:
            raise InferenceError(f"unknown outputs {unknown}; known: {[*OUTPUTS, *bundle.scores]}")
        alpha = alpha_of(payload.parameters, self._alpha)
        names = tuple(dict.fromkeys((*self._scores, *(k for k in wanted if k in bundle.scores))))
        async with self._engine:
            r = await asyncio.to_thread(score, bundle, x, names)
        raw = {k: v.numpy() for k, v in r.raw.items()}
        if not all(np.isfinite(v).all() for v in raw.values()):
            raise InferenceError("the model produced non-finite values for an image")
        assert bundle.calibration is not None
        predicted = r.predicted.numpy()
        verdict = decision.decide(bundle.calibration, r.thresholded(), alpha, predicted)
        columns: dict[str, list[Any]] = {
            "predicted_class": predicted.astype(int).tolist(),
            "is_adversarial": [bool(f) for f in verdict.flagged],
            "p_value": [float(p) for p in verdict.p_value],
            "instance_score": [float(s) for s in verdict.statistic],
        }
        columns |= {k: [float(v) for v in raw[k]] for k in bundle.scores if k in names}
        outputs = [ResponseOutput(name=k, datatype=OUTPUTS.get(k, "FP64"), shape=[len(x)], data=columns[k]) for k in wanted]
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id, parameters={"alpha": alpha}, outputs=outputs
        )
