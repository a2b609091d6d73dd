"""The decision (docs/detection.md#decision): thresholded scores, a calibration and α in; p-values and
flags out. The service, the gallery, the evaluation harness and the benchmarks all decide here."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.core.calibration import Calibration


@dataclass(frozen=True)
class Verdicts:
    """One decision per image: the decision statistic (N,), its p_value (N,) and flagged (N,) at alpha."""

    p_value: np.ndarray
    flagged: np.ndarray
    alpha: float
    statistic: np.ndarray


def flag(p: np.ndarray, alpha: float) -> np.ndarray:
    """Flag when the conformal p-value is at most α: under exchangeability P(flag | clean) ≤ α."""
    return np.asarray(p) <= alpha


def flag_rate(p: np.ndarray, alpha: float) -> float:
    """The share of images flagged at α (TPR on attacks, realised FPR on clean images); 0 for none."""
    return float(flag(p, alpha).mean()) if len(p) else 0.0


def rates(p: np.ndarray, alphas: Sequence[float], prefix: str) -> dict[str, float]:
    """{f"{prefix}@{α}": flag rate} for each α."""
    return {f"{prefix}@{a}": flag_rate(p, a) for a in alphas}


def decide(cal: Calibration, t: Mapping[str, np.ndarray], alpha: float, predicted: np.ndarray | None = None) -> Verdicts:
    """The bundle's verdict for thresholded scores t (name -> (N,); at least the decision's scores) of
    images predicted as `predicted` (N,) (needed by a class-conditional calibration)."""
    s = cal.decision_statistic(t)
    p = cal.statistic_p_value(s, predicted)
    return Verdicts(p, flag(p, alpha), alpha, s)


def score_p_values(cal: Calibration, t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each calibrated score's own conformal p-value (scores the calibration does not hold are left out)."""
    return {k: cal.p_value(k, np.asarray(v)) for k, v in t.items() if k in cal.values}
