"""The one registry of every score a bundle can serve, and the form scores are thresholded in
(docs/detection.md#scores).

Three producers fill it: the Fisher engine (`service.fisher.compute`: the predictive baselines and the
Fisher scores), the clean-data detectors of `service.core.baselines`, and a bundle's learned detector
(`service.core.learned`: `learned` and the neighbourhood Fisher score `fisher_noise_shift`).
"""

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from service.fisher import SCORES as ENGINE
from service.fisher import ScoreSpec
from service.fisher.scores import LOG_FLOOR

DETECTORS: dict[str, ScoreSpec] = {  # computed by service.core.baselines and service.core.learned
    "mahalanobis": ScoreSpec("high", False),
    "mahalanobis_layers": ScoreSpec("high", False),
    "feature_squeezing": ScoreSpec("high", False),
    "squeeze_drop": ScoreSpec("high", False),
    "learned": ScoreSpec("high", False),
    "fisher_noise_shift": ScoreSpec("high", False),
}
SCORES: dict[str, ScoreSpec] = ENGINE | DETECTORS
DEFAULT = ("confidence", "entropy", "margin")  # what a response carries when the request names no scores


def engine(names: tuple[str, ...] | list[str]) -> list[str]:
    """The names the Fisher engine computes, in order."""
    return [n for n in names if n in ENGINE]


def detectors(names: tuple[str, ...] | list[str]) -> list[str]:
    """The names the clean-data detectors compute, in order."""
    return [n for n in names if n in DETECTORS]


def thresholded(name: str, raw: Tensor) -> Tensor:
    """The form calibrations keep and p-values compare: log10(max(v, 1e-30)) for the scores that span
    decades (`ScoreSpec.log`), the raw value otherwise."""
    return raw.clamp_min(LOG_FLOOR).log10() if SCORES[name].log else raw


def thresholded_all(raw: Mapping[str, Tensor | np.ndarray | float]) -> dict[str, np.ndarray]:
    """Every score of a name -> raw values mapping in thresholded form, as float64 arrays."""
    out = {}
    for name, v in raw.items():
        t = torch.as_tensor(np.asarray(v, dtype=np.float64)) if not isinstance(v, Tensor) else v.detach().cpu().double()
        out[name] = thresholded(name, t).numpy()
    return out
