"""One batch of images through the bundle's scoring, with failures confined to the images that cause
them. The batcher's predict callable; it runs on the batcher's worker thread, never on the event loop."""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from service.core.batches import map_batches
from service.core.bundle import Bundle
from service.core.scoring import score
from service.serve.errors import ServiceError

log = logging.getLogger("fisherguard")


@dataclass
class ImageResult:
    predicted: int
    confidence: float
    scores: dict[str, float]  # raw values
    heatmaps: dict[str, np.ndarray]  # (H, W)


Outcome = ImageResult | ServiceError


class Detector:
    """Scores batches for a bundle; splits a failing batch to isolate bad images and CUDA OOMs."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.batch_ceiling: int | None = None  # lowered after CUDA out-of-memory

    def run(self, x: torch.Tensor, scores: Sequence[str], heatmaps: Sequence[str]) -> list[Outcome]:
        """x (B, C, H, W) on the CPU -> one outcome per image."""
        parts = map_batches(lambda xb: self._isolated(xb, scores, heatmaps), x, batch=self.batch_ceiling or len(x))
        return [o for part in parts for o in part]

    def _isolated(self, x: torch.Tensor, scores: Sequence[str], heatmaps: Sequence[str]) -> list[Outcome]:
        try:
            return self._score(x, scores, heatmaps)
        except torch.OutOfMemoryError:
            if len(x) == 1:
                return [ServiceError(503, "overloaded", "the accelerator ran out of memory for this image")]
            self.batch_ceiling = max(1, len(x) // 2)
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a model may raise anything; it must fail only its own image
            if len(x) == 1:  # the exception's text may describe the model or the data: the log has it, the client does not
                log.error("model %s failed on an image: %s: %s", self.bundle.name, type(e).__name__, e)
                return [ServiceError(422, "model_error", "the model failed on this image (the server's log has the error)")]
        half = len(x) // 2
        return self._isolated(x[:half], scores, heatmaps) + self._isolated(x[half:], scores, heatmaps)

    def _score(self, x: torch.Tensor, scores: Sequence[str], heatmaps: Sequence[str]) -> list[Outcome]:
        r = score(self.bundle, x, scores, heatmaps)
        conf = r.confidence.tolist()
        vals = {k: v.tolist() for k, v in r.raw.items()}
        maps = {k: v.numpy() for k, v in r.heatmaps.items()}
        out: list[Outcome] = []
        for i, y in enumerate(r.predicted.tolist()):
            row = {k: v[i] for k, v in vals.items()}
            if not all(math.isfinite(v) for v in row.values()) or not all(np.isfinite(m[i]).all() for m in maps.values()):
                out.append(ServiceError(422, "non_finite", "the model produced non-finite values for this image"))
                continue
            out.append(ImageResult(int(y), float(conf[i]), row, {k: m[i] for k, m in maps.items()}))
        return out
