"""The learned detector's options compared on the calibration half (docs/detection.md#detector-options).

    python -m bench.detector_options --model mnist --sigma 0.1 --squeezers bits1,median2 \
      --attacks <fit-detector's attacks> --controls <its controls> --out bench/results/detector-options-mnist

Every configuration is trained on part A and measured on part B exactly as `fisherguard fit-detector`
does it (service.lab.learn, the same cached attacks and features): the mean TPR over the training
attacks at α = 0.05 and 0.01, the mean TPR at 0.05 of each family's attacks when that family is left
out of training, and the highest flag rate of any benign control at each α, counted among the changed
images the classifier still reads right (its false alarms; the rate among all of them is kept beside it).

The rule the shipped options were picked by: a configuration is acceptable when no control is flagged
more than α + 0.015 (the goal) plus one binomial standard error of that control's images still read
right, √(α(1 − α)/n); among the acceptable ones, the highest mean TPR over both α; if none is
acceptable, the smallest worst-control excess over α, then the mean TPR.
"""

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import decision
from bench.common import environment, write
from service.cli.common import default_data
from service.core.bundle import Bundle, load_bundle
from service.core.features import FeatureSpec
from service.lab import learn
from service.lab.evaluate import ALPHAS

GOAL_SLACK = decision.CONTROL_SLACK  # the detection goal: each control flagged at most α + this

GRID = (  # kind, then control weight, margin, nuisance ("all": one direction per control; or families), columns left out
    "linear cw=3 nuisance=all",  # the recipe of the first shipped detectors
    "linear cw=3 nuisance=all without=residual",
    "linear cw=3",
    "linear cw=3 margin=8 nuisance=noise+gnoise",
    "mlp cw=3",
    "mlp cw=3 margin=8",
    "mlp cw=3 margin=8 without=residual",
    "mlp cw=30 margin=8",
    "mlp cw=30 margin=8 without=residual",  # shipped for MNIST
    "mlp cw=3 nuisance=all",
    "mlp cw=3 nuisance=all without=residual",
    "mlp cw=10 margin=8 nuisance=noise+gnoise",  # shipped for CIFAR-10
)


def options(text: str, spec: FeatureSpec) -> learn.Options:
    """`mlp cw=10 margin=8 nuisance=noise+gnoise without=residual` -> learn.Options (hidden 64 for an MLP)."""
    words = text.split()
    kv = dict(w.split("=", 1) for w in words[1:])
    unknown = set(kv) - {"cw", "margin", "nuisance", "without", "hidden", "negatives"}
    if unknown or words[0] not in ("linear", "mlp"):
        raise ValueError(f"bad configuration {text!r}: kind linear or mlp, then cw=, margin=, nuisance=, without=, hidden=, negatives=")
    nuisance = kv.get("nuisance", "")
    return learn.Options(
        spec,
        kind=words[0],
        hidden=int(kv.get("hidden", 64)),
        control_weight=float(kv.get("cw", 3)),
        control_margin=float(kv.get("margin", 0)),
        nuisance=bool(nuisance),
        nuisance_families=tuple(nuisance.split("+")) if nuisance and nuisance != "all" else (),
        control_negatives=kv.get("negatives", "all"),
        without=tuple(kv["without"].split("+")) if "without" in kv else (),
    )


def over_bound(rate: float, n: int, alpha: float) -> float:
    """How far a control's flag rate over n images lies above the rule's bound α + 0.015 + √(α(1 − α)/n)."""
    return rate - alpha - GOAL_SLACK - math.sqrt(alpha * (1 - alpha) / max(n, 1))


def row(c: learn.Collected, name: str, opts: learn.Options) -> dict[str, Any]:
    """One configuration, as `fisherguard fit-detector` trains and measures it (learn.fit: part A, part B,
    each family left out), summarised."""
    detector, report = learn.fit(c, opts)
    rows = {s: r["seen"] for s, r in report["rows"].items()}
    right = {s: report["rows"][s]["still_right"] for s in c.controls}  # the controls' false alarms
    out: dict[str, Any] = {"options": name, "features": len(detector.names), "rows": rows, "still_right": right}
    excess = lambda s, alpha: over_bound(right[s][f"tpr@{alpha}"], right[s]["n"], alpha)  # noqa: E731
    for alpha in ALPHAS:
        out[f"mean_tpr@{alpha}"] = float(np.mean([rows[s][f"tpr@{alpha}"] for s in c.attacks]))
        out[f"worst_control@{alpha}"] = max(right[s][f"tpr@{alpha}"] for s in c.controls)
        out[f"worst_control_all@{alpha}"] = max(rows[s][f"tpr@{alpha}"] for s in c.controls)
        out[f"over_bound@{alpha}"] = max(excess(s, alpha) for s in c.controls)
    out["mean_tpr"] = float(np.mean([out[f"mean_tpr@{alpha}"] for alpha in ALPHAS]))
    out["left_out_tpr@0.05"] = float(np.mean([report["rows"][s]["left_out"]["tpr@0.05"] for s in c.attacks]))
    out["acceptable"] = all(out[f"over_bound@{alpha}"] <= 1e-9 for alpha in ALPHAS)
    out["control_excess"] = max(out[f"worst_control@{alpha}"] - alpha for alpha in ALPHAS)
    return out


def rank(r: dict[str, Any]) -> tuple[bool, float, float]:
    """Acceptable first by mean TPR; then the rest by their worst control's excess over α, then mean TPR."""
    return (not r["acceptable"], 0.0 if r["acceptable"] else round(r["control_excess"], 3), -r["mean_tpr"])


def over_line(r: dict[str, Any], alpha: float) -> int:
    """How many controls a configuration flags above the goal's line α + 0.015, among their images still read right."""
    return decision.controls_over(list(r["still_right"].values()), (alpha,))


def markdown(rows: list[dict[str, Any]], controls: list[str]) -> str:
    attacks = [s for s in rows[0]["rows"] if s not in controls] if rows else []
    lines = [
        "# Detector options on the calibration half (trained on part A, measured on part B)",
        "",
        "Best first by the rule in bench/detector_options.py. TPR: mean over the training attacks; left out: mean TPR @ 0.05 "
        "of each family's attacks with the family left out of training; controls: the highest flag rate of any control "
        "among its changed images the classifier still reads right (per control: that rate; all its images after the semicolon); "
        "over the line: how many controls are flagged above α + 0.015 among those images.",
        "",
        "| options | features | acceptable | mean TPR @ 0.05 / 0.01 | left out @ 0.05 | worst control @ 0.05 / 0.01 | "
        "over the line @ 0.05 / 0.01 | " + " | ".join(controls) + " |",
        "|" + "---|" * (7 + len(controls)),
    ]
    for r in rows:
        cells = " | ".join(f"{r['still_right'][s]['tpr@0.05']:.3f}; {r['rows'][s]['tpr@0.05']:.3f}" for s in controls)
        lines.append(
            f"| {r['options']} | {r['features']} | {'yes' if r['acceptable'] else 'no'} | {r['mean_tpr@0.05']:.3f} / {r['mean_tpr@0.01']:.3f} "
            f"| {r['left_out_tpr@0.05']:.3f} | {r['worst_control@0.05']:.3f} / {r['worst_control@0.01']:.3f} "
            f"| {over_line(r, 0.05)} / {over_line(r, 0.01)} | {cells} |"
        )
    lines += ["", "Each training attack, TPR @ 0.05 / 0.01 on part B:", "", "| options | " + " | ".join(attacks) + " |"]
    lines.append("|" + "---|" * (1 + len(attacks)))
    for r in rows:
        lines.append(
            f"| {r['options']} | " + " | ".join(f"{r['rows'][s]['tpr@0.05']:.2f} / {r['rows'][s]['tpr@0.01']:.2f}" for s in attacks) + " |"
        )
    return "\n".join(lines) + "\n"


def add_study_arguments(ap: argparse.ArgumentParser) -> None:
    """What every part-B study of the detector takes: the bundle, fit-detector's feature options, attacks
    and controls, the two parts' limits, the cache, the threads and the output folder."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--sigma", type=float, required=True)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--squeezers", required=True)
    ap.add_argument("--attacks", required=True)
    ap.add_argument("--controls", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--validate-limit", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path(".cache/attacks"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)


def collected(a: argparse.Namespace) -> tuple[Bundle, FeatureSpec, learn.Collected]:
    """The bundle, the feature options and fit-detector's feature tables (learn.collect) that add_study_arguments names."""
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model)
    spec = FeatureSpec(a.sigma, a.draws, tuple(a.squeezers.split(",")))
    c = learn.collect(
        bundle, default_data(bundle.card), a.attacks.split(","), a.controls.split(","), spec, a.limit, a.validate_limit, a.cache, log=print
    )
    return bundle, spec, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    add_study_arguments(ap)
    ap.add_argument("--grid", default=";".join(GRID), help="configurations separated by ';' (default: GRID)")
    a = ap.parse_args()
    _, spec, c = collected(a)
    rows = sorted((row(c, text, options(text, spec)) for text in a.grid.split(";")), key=rank)
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "options.json", {"environment": environment("cpu"), "model": a.model, "controls": c.controls, "rows": rows})
    (a.out / "options.md").write_text(markdown(rows, c.controls))
    print(markdown(rows, c.controls))


if __name__ == "__main__":
    main()
