"""One batch of images through the Fisher engine, with failures confined to the images that cause them.

Runs on the batcher's worker thread, never on the event loop.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.baselines import baseline_scores
from service.bundle import Bundle
from service.errors import ServiceError
from service.fisher import SCORES, compute, to_log10


@dataclass
class ImageResult:
    predicted: int
    confidence: float
    scores: dict[str, float]  # raw values
    heatmaps: dict[str, np.ndarray]  # (H, W)


Outcome = ImageResult | ServiceError


class Detector:
    """Scores batches for a bundle; splits a failing batch to isolate bad images and CUDA OOMs."""

    def __init__(self, bundle: Bundle, device: torch.device) -> None:
        self.bundle, self.device = bundle, device
        self.options: dict[str, Any] = dict(bundle.calibration.score_options) if bundle.calibration else {}
        self.batch_ceiling: int | None = None  # lowered after CUDA out-of-memory

    def run(self, x: torch.Tensor, scores: Sequence[str], heatmaps: Sequence[str]) -> list[Outcome]:
        """x (B, C, H, W) on CPU -> one outcome per image."""
        step = self.batch_ceiling or len(x)
        out: list[Outcome] = []
        for i in range(0, len(x), step):
            out += self._isolated(x[i : i + step], scores, heatmaps)
        return out

    def _isolated(self, x: torch.Tensor, scores: Sequence[str], heatmaps: Sequence[str]) -> list[Outcome]:
        try:
            return self._score(x, scores, heatmaps)
        except torch.OutOfMemoryError:
            if len(x) == 1:
                return [ServiceError(503, "overloaded", "the accelerator ran out of memory for this image")]
            self.batch_ceiling = max(1, len(x) // 2)
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a model may raise anything; it must fail only its own image
            if len(x) == 1:
                return [ServiceError(422, "model_error", f"the model failed on this image: {type(e).__name__}: {e}")]
        half = len(x) // 2
        return self._isolated(x[:half], scores, heatmaps) + self._isolated(x[half:], scores, heatmaps)

    def _score(self, x: torch.Tensor, scores: Sequence[str], heatmaps: Sequence[str]) -> list[Outcome]:
        x = x.to(self.device)
        r = compute(self.bundle.model, x, [s for s in scores if s in SCORES], heatmaps, **self.options)
        extra = baseline_scores(self.bundle.model, x, [s for s in scores if s not in SCORES], self.bundle.mahalanobis)
        conf = r.probs.gather(1, r.predicted[:, None]).squeeze(1).cpu()
        vals = {k: v.cpu().tolist() for k, v in (r.scores | extra).items()}
        maps = {k: v.cpu().numpy() for k, v in r.heatmaps.items()}
        out: list[Outcome] = []
        for i, y in enumerate(r.predicted.cpu().tolist()):
            row = {k: v[i] for k, v in vals.items()}
            if not all(math.isfinite(v) for v in row.values()) or not all(np.isfinite(m[i]).all() for m in maps.values()):
                out.append(ServiceError(422, "non_finite", "the model produced non-finite values for this image"))
                continue
            out.append(ImageResult(int(y), float(conf[i]), row, {k: m[i] for k, m in maps.items()}))
        return out


def _thresholded(name: str, raw: float) -> np.ndarray:
    """The form calibrations keep: log10 for the Fisher scores that are thresholded so, raw otherwise. -> (1,)."""
    t = torch.tensor([raw], dtype=torch.float64)
    return (to_log10(name, t) if name in SCORES else t).numpy()


def p_values(bundle: Bundle, scores: dict[str, float]) -> dict[str, float]:
    """Conformal p-value of each calibrated score."""
    cal = bundle.calibration
    if cal is None:
        return {}
    return {k: float(cal.p_value(k, _thresholded(k, v))[0]) for k, v in scores.items() if k in cal.values}


def decision_p_value(bundle: Bundle, raw: dict[str, float]) -> float:
    """The p-value the flag is decided on, from one image's raw scores (at least the decision's)."""
    cal = bundle.calibration
    assert cal is not None
    t = {k: _thresholded(k, raw[k]) for k in cal.decision_scores}
    return float(cal.decision_p_value(t)[0])
