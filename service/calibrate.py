"""`fisherguard calibrate`: clean, correctly classified images -> calibration.json (design.md §5)."""

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.bundle import Bundle
from service.calibration import COMBINED, Calibration, Combination, Component
from service.data import Dataset
from service.scoring import score_batches

DEFAULT_OPTIONS: dict[str, Any] = {"noise_sigma": 0.1, "noise_samples": 16}


def _check_decision(statistic: str, components: Sequence[Component], available: set[str]) -> None:
    """A decision statistic and components that the available scores can serve."""
    if statistic not in available and statistic != COMBINED:
        raise ValueError(f"unknown decision statistic {statistic!r}; known: {sorted(available)} or {COMBINED!r}")
    missing = [c.score for c in components if c.score not in available]
    if missing:
        raise ValueError(f"this bundle cannot compute {missing}; it has {sorted(available)}")
    if (statistic == COMBINED) != bool(components):
        raise ValueError("components go with the statistic 'combined', and it needs at least one")


def calibrate(
    bundle: Bundle,
    data: Dataset,
    alpha: float,
    statistic: str,
    tail: str = "one-sided",
    batch_size: int = 64,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    components: Sequence[Component] = (),
) -> Calibration:
    """Scores every clean image the model classifies correctly; keeps the sorted values per score.
    statistic "combined" fits a Combination of `components` on two seeded halves of those images."""
    _check_decision(statistic, components, set(bundle.scores))
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    values, pred = score_batches(bundle.model, data.x, list(bundle.scores), opts, batch_size, progress, bundle.mahalanobis)
    correct = pred == data.y.numpy()
    combination = Combination.fit(components, {k: v[correct] for k, v in values.items()}) if components else None
    return Calibration(
        weights_sha256=bundle.weights_sha256,
        data={
            "description": data.description + ", correctly classified images only",
            "sha256": data.sha256,
            "images": len(data.y),
            "correct": int(correct.sum()),
        },
        alpha=alpha,
        statistic=statistic,
        values={k: np.sort(v[correct]) for k, v in values.items()},
        score_options=opts,
        tail=tail,
        combination=combination,
    )


def same_values(a: np.ndarray, b: np.ndarray, tol: float = 1e-2) -> bool:
    """Sorted values a, b (n,) equal up to float32 noise: max |a − b| ≤ tol · IQR(b). Scoring in other
    batch sizes moves Fisher scores of the most confident images by up to ~0.4% of the IQR (CIFAR-10
    net; the median image by ~1e-6); another image set or other weights moves the quantiles far more."""
    if a.shape != b.shape:
        return False
    iqr = float(np.subtract(*np.percentile(b, [75, 25]))) if len(b) else 0.0
    return bool(np.all(np.abs(a - b) <= tol * iqr + 1e-12 * np.abs(b)))


def redecide(
    cal: Calibration, clean: Mapping[str, np.ndarray], alpha: float, statistic: str, tail: str, components: Sequence[Component] = ()
) -> Calibration:
    """A new decision on the same clean images, without scoring them again: clean holds their values
    aligned per image (score -> (n,)), e.g. the clean part of `fisherguard evaluate --split calibration`
    on the same bundle; every score must sort to cal's values up to float32 reproducibility (the same
    images and weights scored in other batches: within 1% of the values' interquartile range)."""
    for name, values in cal.values.items():
        if name not in clean or not same_values(np.sort(clean[name]), np.asarray(values)):
            raise ValueError(
                f"the per-image scores do not match this calibration's values of {name!r}: score the same split with the same weights"
            )
    _check_decision(statistic, components, set(cal.values))
    combination = Combination.fit(components, {k: np.asarray(v, dtype=np.float64) for k, v in clean.items()}) if components else None
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return dataclasses.replace(cal, alpha=alpha, statistic=statistic, tail=tail, combination=combination, created=now)


def clean_scores(path: Path) -> dict[str, np.ndarray]:
    """The clean images' per-image values from an evaluate run's scores.npz."""
    with np.load(path) as z:
        return {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("clean/")}
