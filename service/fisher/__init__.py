"""The Fisher-information math (docs/fisher.md), free of any HTTP concern.

from service.fisher import compute
result = compute(model, x, scores=("sensitivity", "fisher_param_trace"), heatmaps=("fis",))
"""

from service.fisher.compute import FisherResult, compute
from service.fisher.scores import HEATMAPS, SCORES, ScoreSpec, to_log10

__all__ = ["HEATMAPS", "SCORES", "FisherResult", "ScoreSpec", "compute", "to_log10"]
