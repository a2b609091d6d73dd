"""Scoring whole datasets in batches with the bundle's score options (calibration, evaluation)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from service.baselines import Mahalanobis, baseline_scores
from service.fisher import SCORES, compute, to_log10


def score_batches(
    model: nn.Module,
    x: torch.Tensor,
    scores: Sequence[str],
    options: dict[str, Any],
    batch_size: int = 64,
    progress: bool = False,
    mahalanobis: Mahalanobis | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Thresholded-form scores (log10 for Fisher scores; baselines raw) name -> (N,), and predictions (N,)."""
    device = next(model.parameters()).device
    fisher = [s for s in scores if s in SCORES]
    extra = [s for s in scores if s not in SCORES]
    out: dict[str, list[np.ndarray]] = {s: [] for s in scores}
    preds = []
    starts = range(0, len(x), batch_size)
    for i in _bar(starts, progress, "scoring"):
        xb = x[i : i + batch_size].to(device)
        r = compute(model, xb, fisher, **options)
        for s in fisher:
            out[s].append(to_log10(s, r.scores[s]).cpu().numpy())
        for s, v in baseline_scores(model, xb, extra, mahalanobis).items():
            out[s].append(v.cpu().numpy())
        preds.append(r.predicted.cpu().numpy())
    return {s: np.concatenate(v) for s, v in out.items()}, np.concatenate(preds)


def _bar(it: range, on: bool, desc: str) -> Any:
    if not on:
        return it
    try:
        from tqdm import tqdm

        return tqdm(it, desc=desc, unit="batch")
    except ImportError:
        return it
