"""Where the shipped linear detectors put their weight: the share of |w| (on the standardised features,
after the nuisance projection) carried by each group of features.

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


def shares(name: str) -> dict[str, Any]:
    detector = load_bundle(name).detector
    if detector is None or detector.kind != "linear":
        raise ValueError(f"{name}: no linear detector")
    w = detector.weights
    weight = (w["proj"] @ w["w"] if "proj" in w else w["w"]).double().abs()  # (F,): h·proj·w = h·(proj w)
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
