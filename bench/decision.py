"""Choose a bundle's decision statistic on its *calibration* half (docs/detection.md#protocol: never on the evaluation half).

Reads the per-image scores of `fisherguard evaluate --split calibration ... --out DIR` (DIR/scores.npz),
splits the clean calibration-half images at random into a fitting part and a held-out part, fits
every candidate decision on the fitting part (single scores one- or two-sided, and calibrated
combinations — the smallest of several p-values, `service.calibration.Combination`), and measures
on the held-out clean images (FPR) and on each attack (TPR, AUC). The rule: among the decisions that
flag no benign control (noise, JPEG, blur, contrast, brightness) more than α + 0.015 at α = 0.05 or 0.01, the highest mean TPR over
the attacks and both α — the issue's goal is set at 0.05, the service flags at 0.01 by default, so a
decision must hold at both — then the highest worst-case TPR at α = 0.05. A control's flags are
counted among the changed images the classifier still reads right when the run recorded which those
are (its false alarms; a brightened digit the classifier now misreads is one to flag), among all of
them otherwise; both rates are reported. When no decision is admissible, the one with the fewest
(control, α) pairs flagged above α + 0.015 first — the goal holds each control, so one control every
decision misses must not hide the others — then the one whose worst control is flagged least above α
(rounded to 0.001), then the same:

    python -m bench.decision --scores /tmp/select-mnist/scores.npz --out bench/results/decision-mnist
"""

import argparse
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import environment, write
from service.core import decision
from service.core.calibration import Combination, Component
from service.lab.attack_specs import KINDS
from service.lab.evaluate import ALPHAS, MISREAD
from service.lab.stats import roc_auc

CANDIDATES = [
    Component("fisher_input_trace", "two-sided"),
    Component("fisher_input_trace", "one-sided"),
    Component("margin", "two-sided"),
    Component("margin", "one-sided"),
    Component("sensitivity", "one-sided"),
    Component("sensitivity", "two-sided"),
    Component("fisher_noise_kl", "two-sided"),
    Component("fisher_noise_kl", "one-sided"),
    Component("fisher_param_trace", "two-sided"),
    Component("feature_squeezing", "one-sided"),
    Component("squeeze_drop", "one-sided"),
    Component("mahalanobis", "one-sided"),
    Component("mahalanobis_layers", "one-sided"),
    Component("learned", "one-sided"),
    Component("fisher_noise_shift", "one-sided"),
]
CONTROLS = tuple(k for k, kind in KINDS.items() if kind.control)  # clean images changed in ways that are not attacks
CONTROL_SLACK = 0.015  # a decision is admissible when every control is flagged at most α + this (the FPR tolerance of the detection goal)


class Product(Combination):
    """Fisher's method, measured beside the served minimum: Π_j p_j (≡ −Σ_j log p_j) in place of min_j p_j,
    calibrated on part B the same way (`--combine product`)."""

    def min_p(self, t: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.multiply.reduce(self.component_p_values(t))


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """clean: score -> values; attacks: attack -> score -> values (controls included); misread:
    control -> which of its images the classifier misreads (for the runs that recorded it)."""
    z = np.load(path)
    clean: dict[str, np.ndarray] = {}
    attacks: dict[str, dict[str, np.ndarray]] = {}
    misread: dict[str, np.ndarray] = {}
    for key in z.files:
        group, score = key.rsplit("/", 1)
        if group == "clean":
            clean[score] = z[key]
        elif score == MISREAD:
            misread[group] = z[key].astype(bool)
        elif group != "calibration":
            attacks.setdefault(group, {})[score] = z[key]
    return clean, attacks, misread


def measure(
    components: tuple[Component, ...],
    fit: dict[str, np.ndarray],
    held: dict[str, np.ndarray],
    attacks: dict[str, dict[str, np.ndarray]],
    kind: type[Combination] = Combination,
    misread: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    combo = kind.fit(components, fit)
    p_clean = combo.p_value(held)
    # ranking by the uncalibrated min-p is the same as by the calibrated p, with fewer ties
    m_clean = combo.min_p(held)
    row: dict[str, Any] = {"components": [f"{c.score}:{c.tail}" for c in components], **decision.rates(p_clean, ALPHAS, "fpr")}
    row["attacks"] = {}
    for name, adv in attacks.items():
        if not len(next(iter(adv.values()))):
            continue
        p_adv, m_adv = combo.p_value(adv), combo.min_p(adv)
        row["attacks"][name] = decision.rates(p_adv, ALPHAS, "tpr") | {"auc": roc_auc(-m_clean, -m_adv)}
        if misread is not None and name in misread:
            row["attacks"][name] |= decision.rates(p_adv[~misread[name]], ALPHAS, "still_right")
    real = [a for n, a in row["attacks"].items() if n.split(":")[0] not in CONTROLS]
    controls = [a for n, a in row["attacks"].items() if n.split(":")[0] in CONTROLS]
    for alpha in ALPHAS:
        row[f"worst_control@{alpha}"] = max((false_alarms(c, alpha) for c in controls), default=0.0)
        row[f"worst_control_all@{alpha}"] = max((c[f"tpr@{alpha}"] for c in controls), default=0.0)
        row[f"mean_tpr@{alpha}"] = float(np.mean([a[f"tpr@{alpha}"] for a in real]))
    row["control_excess"] = excess_over_alpha({alpha: row[f"worst_control@{alpha}"] for alpha in ALPHAS})
    row["controls_over"] = controls_over(controls)
    row["admissible"] = row["controls_over"] == 0  # ⟺ control_excess ≤ CONTROL_SLACK
    row["mean_tpr"] = float(np.mean([row[f"mean_tpr@{alpha}"] for alpha in ALPHAS]))
    row["worst_tpr@0.05"] = min(a["tpr@0.05"] for a in real)
    row["worst_auc"] = min(a["auc"] for a in real)
    return row


def cell(rates: Mapping[str, float]) -> str:
    """An attack's TPR at 0.05 / 0.01; a control's flag rate, and its false alarms when the run recorded them."""
    out = f"{rates['tpr@0.05']:.3f} / {rates['tpr@0.01']:.3f}"
    return out + (f"; {rates['still_right@0.05']:.3f} / {rates['still_right@0.01']:.3f}" if "still_right@0.05" in rates else "")


def excess_over_alpha(worst_control: Mapping[float, float]) -> float:
    """How far past α the worst control is flagged, max over α of (rate − α), rounded to 1e-9: the rates
    are counts over a few hundred images, and 0.025 − 0.01 is 0.015000000000000001 in floating point,
    which must not make a control flagged at exactly α + CONTROL_SLACK inadmissible."""
    return round(max(rate - alpha for alpha, rate in worst_control.items()), 9)


def false_alarms(control: Mapping[str, float], alpha: float) -> float:
    """A control's flag rate at α among the images the classifier still reads right, when the run
    recorded which those are; among all of them otherwise."""
    return control.get(f"still_right@{alpha}", control[f"tpr@{alpha}"])


def controls_over(controls: list[dict[str, float]], alphas: Sequence[float] = ALPHAS) -> int:
    """How many (control, α) pairs are flagged above α + CONTROL_SLACK, with excess_over_alpha's rounding."""
    return sum(excess_over_alpha({alpha: false_alarms(c, alpha)}) > CONTROL_SLACK for c in controls for alpha in alphas)


def rank(row: dict[str, Any]) -> tuple[int, float, float, float]:
    """The rule's order: the fewest (control, α) pairs over α + CONTROL_SLACK first — none for the
    admissible decisions — then, among the inadmissible, the smallest excess of their worst control over
    α (so that when no decision is admissible the top row is the one that departs from the goal on the
    fewest controls, and least); then the highest mean TPR, then the highest worst TPR at 0.05."""
    excess = 0.0 if row["admissible"] else round(row["control_excess"], 3)
    return (row["controls_over"], excess, -row["mean_tpr"], -row["worst_tpr@0.05"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--scores", type=Path, required=True, help="scores.npz of an evaluate run on the calibration half")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-components", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--combine", choices=("min", "product"), default="min", help="how several p-values combine (the service serves min)")
    a = ap.parse_args()
    clean, attacks, misread = load(a.scores)
    present = [c for c in CANDIDATES if c.score in clean and all(c.score in v for v in attacks.values())]
    perm = np.random.default_rng(7).permutation(len(next(iter(clean.values()))))
    half = len(perm) // 2
    fit = {k: v[perm[:half]] for k, v in clean.items()}
    held = {k: v[perm[half:]] for k, v in clean.items()}
    rows = []
    for r in range(1, a.max_components + 1):
        for combo in itertools.combinations(present, r):
            if len({c.score for c in combo}) < r:
                continue  # one tail per score
            rows.append(measure(combo, fit, held, attacks, Product if a.combine == "product" and r > 1 else Combination, misread))
    rows.sort(key=rank)
    names = list(rows[0]["attacks"])
    lines = [
        f"# Decision candidates on the calibration half ({a.scores}{'; p-values combined by their product' if a.combine == 'product' else ''})",
        "",
        f"Fitted on {half} clean calibration-half images, measured on the other {len(perm) - half} and on the attacks. "
        f"TPR at α = 0.05 / 0.01 per attack. Decisions that flag a benign control more often than α + {CONTROL_SLACK} "
        "at either α are inadmissible and listed last, the fewest (control, α) pairs over that first, then the least "
        "excess of their worst control over α; "
        "then sorted by the mean TPR over the non-control attacks and both α, then the worst TPR at 0.05."
        + (
            " A control's cell is its flag rate among all its images, then, after a semicolon, among those the classifier "
            "still reads right (its false alarms, which the rule counts)."
            if misread
            else ""
        ),
        "",
        "| decision | admissible | controls over | clean FPR | mean TPR | mean TPR@0.05 | mean TPR@0.01 | worst TPR@0.05 | worst AUC | "
        + " | ".join(names)
        + " |",
        "|" + "---|" * (9 + len(names)),
    ]
    for row in rows[: a.top]:
        cells = " | ".join(cell(row["attacks"][n]) for n in names)
        lines.append(
            f"| {' + '.join(row['components'])} | {'yes' if row['admissible'] else 'no'} | {row['controls_over']} | {row['fpr@0.05']:.3f} / {row['fpr@0.01']:.3f} "
            f"| {row['mean_tpr']:.3f} | {row['mean_tpr@0.05']:.3f} | {row['mean_tpr@0.01']:.3f} | {row['worst_tpr@0.05']:.3f} "
            f"| {row['worst_auc']:.3f} | {cells} |"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "decision.json", {"environment": environment("cpu"), "scores": str(a.scores), "rows": rows})
    (a.out / "decision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
