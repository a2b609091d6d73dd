"""The Fisher-information math (design.md §3), free of any HTTP concern.

from service.fisher import compute
result = compute(model, x, scores=("sensitivity", "fisher_param_trace"), heatmaps=("fis",))
"""

from service.fisher.compute import HEATMAPS, SCORES, FisherResult, ScoreSpec, compute, to_log10

__all__ = ["HEATMAPS", "SCORES", "FisherResult", "ScoreSpec", "compute", "to_log10"]
