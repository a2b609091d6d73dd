"""Class-conditional (Mondrian) calibration against the pooled one, on the calibration half.

    python -m bench.mondrian --model mnist --scores bench/results/select-mnist/scores.npz --out bench/results/mondrian-mnist

The pooled conformal p-value guarantees P(p ≤ α) ≤ α over all clean images; a Mondrian one ranks an
image only among the clean images of its predicted class, so the guarantee holds within every class
(Vovk et al. 2005). Whether that is worth the coarser reference (n/K images per class) depends on how
far the pooled decision's per-class false-positive rates stray from α. This measures it for the
bundle's shipped decision statistic on part B of the calibration half (the clean images a decision
is chosen on), over repeated random halvings: one half calibrates (pooled, or per class), the other
measures each class's realised false-positive rate.

For a combined decision the statistic is m(x), the minimum of the component p-values against the
shipped combination's reference; only part B's images outside that reference are used (the
combination's own seeded split), so m is computed on images the reference has not seen.
"""

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import environment, write
from service.cli.common import default_data
from service.core.bundle import load_bundle
from service.core.calibration import conformal_p_value
from service.core.scores import SCORES
from service.core.scoring import predict
from service.lab.data import load_dataset

ALPHAS = (0.05, 0.01)


def statistic(scores: Path, model: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(values (n,), labels (n,), direction) of the shipped decision's statistic on part B's clean images."""
    bundle = load_bundle(model)
    cal = bundle.calibration
    assert cal is not None
    with np.load(scores) as z:
        clean = {s: z[f"clean/{s}"] for s in cal.decision_scores}
        margin = z["clean/margin"]
    data = load_dataset(default_data(bundle.card), "calibration-b", bundle.classes, bundle.input)
    with torch.no_grad():
        z_all = torch.cat([bundle.model(data.x[i : i + 500]) for i in range(0, len(data.y), 500)])
    keep = (z_all.argmax(1) == data.y).numpy()
    assert keep.sum() == len(margin) and (predict(bundle, data.x[keep]) == data.y[keep]).all(), "not the run's clean images"
    labels = data.y.numpy()[keep]
    if cal.combination is None:
        return np.asarray(clean[cal.statistic]), labels, SCORES[cal.statistic].direction
    n = len(labels)
    b = np.random.default_rng(0).permutation(n)[n // 2 :]  # Combination.fit's part B: unseen by the reference
    m = cal.combination.min_p({k: v[b] for k, v in clean.items()})
    return m, labels[b], "low"


def per_class_fpr(values: np.ndarray, labels: np.ndarray, direction: str, classes: int, reps: int, seed: int = 0) -> dict[str, Any]:
    """Realised false-positive rate per class, pooled against Mondrian, averaged over `reps` halvings."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for mode in ("pooled", "mondrian"):
        rates = np.zeros((reps, len(ALPHAS), classes))
        for r in range(reps):
            perm = rng.permutation(len(values))
            cal, test = perm[: len(perm) // 2], perm[len(perm) // 2 :]
            for c in range(classes):
                tc = test[labels[test] == c]
                ref = values[cal] if mode == "pooled" else values[cal[labels[cal] == c]]
                p = conformal_p_value(np.sort(ref), values[tc], direction)
                for i, a in enumerate(ALPHAS):
                    rates[r, i, c] = (p <= a).mean() if len(tc) else np.nan
        mean = np.nanmean(rates, 0)  # (alphas, classes)
        out[mode] = {
            str(a): {"per_class": [round(float(v), 4) for v in mean[i]], "max": float(np.nanmax(mean[i])), "min": float(np.nanmin(mean[i]))}
            for i, a in enumerate(ALPHAS)
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--scores", type=Path, required=True, help="scores.npz of an evaluate run on calibration-b")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    values, labels, direction = statistic(a.scores, a.model)
    classes = int(labels.max()) + 1
    result = per_class_fpr(values, labels, direction, classes, a.reps)
    counts = np.bincount(labels, minlength=classes).tolist()
    lines = [
        f"# {a.model}: per-class clean false-positive rate, pooled and Mondrian calibration",
        "",
        f"{len(values)} clean part-B images ({', '.join(map(str, counts))} per class), halved {a.reps} times: one half "
        "calibrates, the other measures; mean realised rate per predicted class.",
        "",
        "| α | calibration | " + " | ".join(str(c) for c in range(classes)) + " | min | max |",
        "|---|---|" + "---|" * (classes + 2),
    ]
    for al in map(str, ALPHAS):
        for mode in ("pooled", "mondrian"):
            r = result[mode][al]
            lines.append(f"| {al} | {mode} | " + " | ".join(f"{v:.3f}" for v in r["per_class"]) + f" | {r['min']:.3f} | {r['max']:.3f} |")
    write(a.out / "mondrian.json", {"environment": environment("cpu"), "model": a.model, "n": len(values), "per_class_n": counts} | result)
    (a.out / "mondrian.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
