"""Statistics of detection (docs/detection.md#protocol): ROC-AUC with ties, ROC points, bootstrap intervals,
exact intervals of rates."""

import numpy as np


def roc_auc(clean: np.ndarray, adv: np.ndarray) -> float:
    """P(adv more unusual than clean) + ½ P(tie), with larger = more unusual."""
    both = np.concatenate([clean, adv])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]  # average ranks for ties
    return float((ranks[len(clean) :].sum() - len(adv) * (len(adv) + 1) / 2) / (len(clean) * len(adv)))


def roc_points(clean: np.ndarray, adv: np.ndarray, n: int = 51) -> list[list[float]]:
    """[FPR, TPR] at n thresholds spread over the quantiles of both sets (larger = more unusual)."""
    thresholds = np.unique(np.quantile(np.concatenate([clean, adv]), np.linspace(0, 1, n)))[::-1]
    fpr = [float((clean >= t).mean()) for t in thresholds]
    tpr = [float((adv >= t).mean()) for t in thresholds]
    return [[0.0, *fpr, 1.0], [0.0, *tpr, 1.0]]


def bootstrap_auc(clean: np.ndarray, adv: np.ndarray, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of the AUC over `reps` resamples of both sets."""
    rng = np.random.default_rng(seed)
    aucs = [roc_auc(rng.choice(clean, len(clean)), rng.choice(adv, len(adv))) for _ in range(reps)]
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def rate_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a rate k / n: it holds the true rate with probability at
    least `level`. For k = 0 the lower end is 0 and the upper 1 − ((1 − level) / 2)^(1/n)."""
    from scipy.stats import binomtest

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 ≤ k ≤ n and n > 0, got k = {k}, n = {n}")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)
