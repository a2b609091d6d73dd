"""Fisher-regularised training (Shen et al.): for each trained β, clean accuracy, PGD-L∞ robust
accuracy, the clean distribution of λ_max(G_x), and the detection ROC-AUC of the tr G_x two-sided
decision (calibrated per model on the calibration half, measured on the evaluation half, docs/detection.md#protocol).

    python -m bench.fisherreg --models mnist:0 /tmp/fr/beta0.1:0.1 /tmp/fr/beta1:1 /tmp/fr/beta10:10 \\
        --data ../shared/data/mnist.npz --eps 0.1,0.3 --limit 1000 --out bench/results/fisherreg-mnist

Models come from `fisherguard train --bundle mnist --fisher-penalty β --out DIR`; β = 0 is the shipped recipe.
"""

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import environment, write
from service.core import decision
from service.core.bundle import load_bundle
from service.core.calibration import tail_p_value
from service.core.scoring import predict, score_dataset
from service.lab import attacks
from service.lab.data import load_dataset, load_train_subset, seeded_pick
from service.lab.stats import bootstrap_auc, roc_auc

SCORES = ("fisher_input_trace", "fisher_input_eig")


def two_sided_p(cal: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The tr G_x two-sided decision p-value (its direction is irrelevant when two-sided)."""
    return tail_p_value(cal, t, "high", "two-sided")


def measure(spec: str, data: Path, eps_list: list[float], limit: int, alphas: tuple[float, ...]) -> dict[str, Any]:
    path, beta = spec.rsplit(":", 1)
    bundle = load_bundle(path, "cpu")
    model = bundle.model
    full = load_dataset(data, "all", bundle.classes, bundle.input)
    cal_half = load_dataset(data, "calibration", bundle.classes, bundle.input)
    ev = load_dataset(data, "evaluation", bundle.classes, bundle.input)
    cal_scores, cal_pred = score_dataset(bundle, cal_half.x, SCORES, opts={})
    cal = np.sort(cal_scores["fisher_input_trace"][cal_pred == cal_half.y.numpy()])
    clean_scores, clean_pred = score_dataset(bundle, ev.x, SCORES, opts={})
    ok = clean_pred == ev.y.numpy()
    p_clean = two_sided_p(cal, clean_scores["fisher_input_trace"][ok])
    pick = seeded_pick(len(ev.y), limit)
    x, y = ev.x[pick], ev.y[pick]  # robust accuracy counts every image of the subset
    xt, _ = load_train_subset(data, 2000)
    train_trace = 10.0 ** score_dataset(bundle, xt, ("fisher_input_trace",), opts={})[0]["fisher_input_trace"]
    row: dict[str, Any] = {
        "train_trace": {"mean": float(train_trace.mean()), "median": float(np.median(train_trace))},
        "model": bundle.name,
        "beta": float(beta),
        "weights_sha256": bundle.weights_sha256,
        "test_accuracy": float((predict(bundle, full.x) == full.y).float().mean()),
        "calibration_n": len(cal),
        "clean_eval_n": int(ok.sum()),
        "log10_lambda_max_clean": {
            f"q{q}": float(np.quantile(clean_scores["fisher_input_eig"][ok], q / 100)) for q in (10, 25, 50, 75, 90)
        },
        "log10_trace_clean_median": float(np.median(clean_scores["fisher_input_trace"][ok])),
        "clean_fpr": {str(a): decision.flag_rate(p_clean, a) for a in alphas},
        "attacks": {},
        "hist": np.histogram(clean_scores["fisher_input_eig"][ok], bins=60, range=(-12, 3))[0].tolist(),
    }
    for eps in eps_list:
        adv = attacks.quantise(attacks.pgd_linf(model, x, y, eps))
        adv_pred = predict(bundle, adv)
        clean_ok = predict(bundle, x) == y
        hit = clean_ok & (adv_pred != y)  # successful attacks on correctly classified images
        adv_scores, _ = score_dataset(bundle, adv[hit], SCORES, opts={})
        p_adv = two_sided_p(cal, adv_scores["fisher_input_trace"])
        auc = roc_auc(-p_clean, -p_adv) if len(p_adv) else float("nan")
        row["attacks"][f"pgd_linf:{eps:g}"] = {
            "robust_accuracy": float((adv_pred == y).float().mean()),
            "n_successful": int(hit.sum()),
            "decision_auc": auc,
            "decision_auc_ci95": list(bootstrap_auc(-p_clean, -p_adv)) if len(p_adv) > 1 else None,
            "raw_trace_auc_high": roc_auc(clean_scores["fisher_input_trace"][ok], adv_scores["fisher_input_trace"]) if len(p_adv) else None,
            "tpr": {str(a): decision.flag_rate(p_adv, a) if len(p_adv) else None for a in alphas},
        }
        print(f"{bundle.name} β={beta} {eps:g}: {row['attacks'][f'pgd_linf:{eps:g}']}", flush=True)
    # gradient masking check: a black-box attack (queries only) at the smallest ε, on a smaller subset
    eps = min(eps_list)
    few = slice(0, min(limit, 300))
    sq = attacks.quantise(attacks.square_linf(model, x[few], y[few], eps))
    row["square_robust_accuracy"] = {f"{eps:g}": float((predict(bundle, sq) == y[few]).float().mean()), "n": len(y[few])}
    row["pgd_robust_accuracy_same_images"] = {
        f"{eps:g}": float((predict(bundle, attacks.quantise(attacks.pgd_linf(model, x[few], y[few], eps))) == y[few]).float().mean())
    }
    print(f"{bundle.name} β={beta} square {eps:g}: {row['square_robust_accuracy']}", flush=True)
    return row


def markdown(rows: list[dict[str, Any]], eps_list: list[float]) -> str:
    head = "| β | test acc | mean tr G_x (train) | median log10 λ_max (clean) | clean FPR@0.05 | " + " | ".join(
        f"PGD {e:g}: robust acc | AUC | TPR@0.05" for e in eps_list
    )
    lines = [head + " |", "|" + "---|" * (5 + 3 * len(eps_list))]
    for r in rows:
        cells = []
        for e in eps_list:
            a = r["attacks"][f"pgd_linf:{e:g}"]
            tpr = a["tpr"]["0.05"]
            cells.append(
                f"{a['robust_accuracy']:.3f} | {a['decision_auc']:.3f} | {tpr:.3f}"
                if tpr is not None
                else f"{a['robust_accuracy']:.3f} | – | –"
            )
        lines.append(
            f"| {r['beta']:g} | {r['test_accuracy']:.4f} | {r['train_trace']['mean']:.3g} | {r['log10_lambda_max_clean']['q50']:.2f} | {r['clean_fpr']['0.05']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    small = f"{min(eps_list):g}"
    lines += [
        "",
        f"Black-box check (Square, queries only, ε = {small}, first {rows[0]['square_robust_accuracy']['n']} images of the subset):",
        "",
    ]
    lines += ["| β | robust acc, Square | robust acc, PGD (same images) |", "|---|---|---|"]
    lines += [f"| {r['beta']:g} | {r['square_robust_accuracy'][e]:.3f} | {r['pgd_robust_accuracy_same_images'][e]:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], eps_list: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    betas = [r["beta"] for r in rows]
    xs = range(len(rows))
    left.plot(xs, [r["test_accuracy"] for r in rows], "o-", label="clean test accuracy")
    for e in eps_list:
        left.plot(xs, [r["attacks"][f"pgd_linf:{e:g}"]["robust_accuracy"] for r in rows], "s--", label=f"PGD-L∞ ε={e:g} robust accuracy")
        left.plot(xs, [r["attacks"][f"pgd_linf:{e:g}"]["decision_auc"] for r in rows], "^:", label=f"detection AUC, PGD ε={e:g}")
    left.set_xticks(list(xs), [f"β={b:g}" for b in betas])
    left.set(ylim=(0, 1.02), title="Accuracy, robustness and detection vs β")
    left.legend(fontsize=7)
    edges = np.linspace(-12, 3, 61)
    for i, r in enumerate(rows):
        right.stairs(r["hist"], edges, label=f"β={r['beta']:g}", color=f"C{i}")
    right.set(xlabel="log10 λ_max(G_x), clean evaluation images", ylabel="images", title="Largest input-Fisher eigenvalue")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "fisherreg.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--models", nargs="+", required=True, help="PATH_OR_NAME:β for each trained model")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mnist.npz"))
    ap.add_argument("--eps", default="0.1,0.3")
    ap.add_argument("--limit", type=int, default=1000, help="evaluation images attacked per model (seeded subset)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fisherreg-mnist"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    eps_list = [float(e) for e in a.eps.split(",")]
    rows = [measure(spec, a.data, eps_list, a.limit, (0.05, 0.01)) for spec in a.models]
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "fisherreg.json", {"environment": environment("cpu"), "data": str(a.data.name), "limit": a.limit, "rows": rows})
    (a.out / "fisherreg.md").write_text(markdown(rows, eps_list))
    plot(rows, eps_list, a.out)
    print(markdown(rows, eps_list))


if __name__ == "__main__":
    main()
