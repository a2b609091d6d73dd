"""The names the engine computes and how each score is read (docs/fisher.md#scores)."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class ScoreSpec:
    """How a score is read: `high` when larger is more unusual; `log` when thresholded as log10."""

    direction: Literal["high", "low"]
    log: bool


SCORES: dict[str, ScoreSpec] = {
    "confidence": ScoreSpec("low", False),
    "entropy": ScoreSpec("high", False),
    "margin": ScoreSpec("low", False),
    "sensitivity": ScoreSpec("high", True),
    "fisher_input_binary": ScoreSpec("high", True),
    "fisher_input_trace": ScoreSpec("high", True),
    "fisher_input_eig": ScoreSpec("high", True),
    "fisher_param_binary": ScoreSpec("high", True),
    "fisher_param_trace": ScoreSpec("high", True),
    "fisher_form": ScoreSpec("high", True),
    "fisher_noise_kl": ScoreSpec("high", True),
}
HEATMAPS: tuple[str, ...] = ("fis", "fisher_diag", "eigvec", "saliency")


def to_log10(name: str, value: Tensor) -> Tensor:
    """The score as thresholded: log10(max(value, 1e-30)) for the Fisher scores, raw otherwise."""
    return value.clamp_min(LOG_FLOOR).log10() if SCORES[name].log else value


def check_names(scores: Sequence[str], heatmaps: Sequence[str]) -> None:
    """ValueError naming the unknown scores or heatmaps and listing the known ones."""
    bad = [s for s in scores if s not in SCORES]
    if bad:
        raise ValueError(f"unknown score(s) {bad}; known scores: {sorted(SCORES)}")
    bad = [h for h in heatmaps if h not in HEATMAPS]
    if bad:
        raise ValueError(f"unknown heatmap(s) {bad}; known heatmaps: {sorted(HEATMAPS)}")
