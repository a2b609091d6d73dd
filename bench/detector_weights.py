"""Where the shipped detectors put their weight: the share of the weight (on the standardised features,
after any nuisance projection) carried by each group of features — |w_f| for a linear detector; for the
two-layer MLP the absolute path weight Σ_h |w2_h| · |w1_{h,f}|, what feature f can move the logit by
through all hidden units.

    python -m bench.detector_weights --out bench/results/detector-weights.json

A reading of the weights, not an ablation: correlated features share weight, so a group's share says
how much of the logit's scale it moves, not what detection would lose without it.
"""

import argparse
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write
from service.core.bundle import load_bundle
from service.core.features import group


def feature_weights(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """(F,) float64: linear |proj w|; MLP Σ_h |w2_h| |(proj w1ᵀ)_{f,h}| (h·proj feeds the model, so proj folds into the first layer)."""
    proj = w["proj"].double() if "proj" in w else None
    if "w1" in w:
        first = w["w1"].double().T  # (F, H)
        first = proj @ first if proj is not None else first
        return (first.abs() * w["w2"].double().abs()).sum(1)
    lin = w["w"].double()
    return (proj @ lin if proj is not None else lin).abs()


def shares(name: str) -> dict[str, Any]:
    detector = load_bundle(name).detector
    if detector is None:
        raise ValueError(f"{name}: no learned detector")
    weight = feature_weights(detector.weights)

    total = float(weight.sum())
    by_group: dict[str, dict[str, float]] = {}
    for feature, v in zip(detector.names, weight.tolist(), strict=True):
        g = by_group.setdefault(group(feature), {"features": 0, "share": 0.0})
        g["features"] += 1
        g["share"] += v / total
    top = sorted(zip(detector.names, (weight / total).tolist(), strict=True), key=lambda t: -t[1])[:8]
    return {"bundle": name, "features": len(detector.names), "groups": by_group, "top": dict(top)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--models", default="mnist,cifar10")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [shares(m) for m in a.models.split(",")]
    for r in rows:
        print(r["bundle"], {g: f"{v['share']:.3f} ({v['features']})" for g, v in r["groups"].items()})
    write(a.out, {"environment": environment("cpu"), "rows": rows})


if __name__ == "__main__":
    main()
