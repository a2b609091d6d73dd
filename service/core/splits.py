"""The seeded split of a test set (docs/detection.md#protocol): perm = default_rng(0).permutation(n);
perm[:n//2] is the calibration half, perm[n//2:] the evaluation half. A bundle with a learned
detector splits the calibration half again: part A (its first half) trains the detector, part B
calibrates it, so that the conformal guarantee is computed on images the detector never saw."""

import numpy as np

SPLITS = ("calibration", "calibration-a", "calibration-b", "evaluation", "all")


def split_indices(n: int, split: str) -> np.ndarray:
    """The indices of one split of n images."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    perm = np.random.default_rng(0).permutation(n)
    half = perm[: n // 2]
    return {
        "calibration": half,
        "calibration-a": half[: len(half) // 2],
        "calibration-b": half[len(half) // 2 :],
        "evaluation": perm[n // 2 :],
        "all": np.arange(n),
    }[split]
