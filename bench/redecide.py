"""A bundle's *current* decision measured on the per-image scores of an earlier `fisherguard evaluate` run.

Attacks and controls do not depend on the decision (only the adaptive ones do), so after the
decision changes — chosen on the calibration half — its evaluation-half rows follow exactly from
that run's `scores.npz` (same images, same adversarial examples, every score of every image).
Adaptive rows are reported apart: those attacks aimed at the decision of the run, not this one.

    python -m bench.redecide --model cifar10 --report bench/results/cifar10 --out bench/results/cifar10-redecided
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import environment, write
from service.core import decision
from service.core.bundle import load_bundle
from service.lab.calibrate import same_values
from service.lab.evaluate import ALPHAS
from service.lab.stats import roc_auc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--report", type=Path, required=True, help="an evaluate --out directory (report.json, scores.npz)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    bundle = load_bundle(a.model)
    cal = bundle.calibration
    if cal is None:
        raise SystemExit(f"bundle {bundle.name} has no calibration.json")
    if cal.mondrian is not None:
        raise SystemExit("a class-conditional decision needs each image's predicted class, which scores.npz does not keep: run evaluate")
    report = json.loads((a.report / "report.json").read_text())
    z = np.load(a.report / "scores.npz")
    if report["bundle"]["weights_sha256"] != bundle.weights_sha256:
        raise SystemExit(f"{a.report} was made with other weights ({report['bundle']['weights_sha256']})")
    for s in cal.decision_scores:  # the run's clean calibration values must be this calibration's
        if not same_values(np.sort(z[f"calibration/{s}"]), cal.values[s]):
            raise SystemExit(f"{a.report}: the calibration values of {s} differ from {bundle.name}'s calibration.json")
    clean = {s: z[f"clean/{s}"] for s in cal.decision_scores}
    p_clean, r_clean = cal.decision_p_value(clean), cal.decision_rank(clean)
    rows: dict[str, Any] = {}
    for name, old in report["attacks"].items():
        adv = {s: z[f"{name}/{s}"] for s in cal.decision_scores}
        p = cal.decision_p_value(adv)
        rows[name] = {
            "control": old["control"],
            "aimed_at_the_runs_decision": name.startswith("adaptive"),
            "success_rate": old["success_rate"],
            "n_successful": old["n_successful"],
            "median_l2": old["median_l2"],
            "median_linf": old["median_linf"],
            "auc": roc_auc(-r_clean, -cal.decision_rank(adv)) if len(p) else float("nan"),
            "previous": old["decision"],
        } | decision.rates(p, ALPHAS, "tpr")
        rows[name]["unflagged_success@0.05"] = old["success_rate"] * (1 - rows[name]["tpr@0.05"])
    fpr = {str(al): decision.flag_rate(p_clean, al) for al in ALPHAS}
    summary = cal.summary() | {"scores": None}
    lines = [
        f"# {bundle.name}: the current decision on the images of {a.report}",
        "",
        f"Decision: {' + '.join(f'{c.score} ({c.tail})' for c in cal.combination.components) if cal.combination else cal.statistic}. "
        f"Clean FPR {fpr['0.05']:.3f} / {fpr['0.01']:.3f} at α = 0.05 / 0.01 ({len(p_clean)} clean). "
        "In brackets: the run's own decision. Adaptive attacks aimed at the run's decision, not this one.",
        "",
        "| attack | success | decision AUC | TPR @ α=0.05 | TPR @ α=0.01 | succeeds unflagged (α=0.05) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        prev = r["previous"]
        label = (
            name + (" (control)" if r["control"] else "") + (" (aimed at the run's decision)" if r["aimed_at_the_runs_decision"] else "")
        )
        lines.append(
            f"| {label} | {r['success_rate']:.3f} | {r['auc']:.3f} ({prev['auc']:.3f}) | {r['tpr@0.05']:.3f} ({prev['tpr@0.05']:.3f}) "
            f"| {r['tpr@0.01']:.3f} ({prev['tpr@0.01']:.3f}) | {r['unflagged_success@0.05']:.3f} |"
        )
    write(
        a.out / "redecided.json",
        {"environment": environment("cpu"), "report": str(a.report), "decision": summary, "clean_fpr": fpr, "attacks": rows},
    )
    (a.out / "redecided.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
