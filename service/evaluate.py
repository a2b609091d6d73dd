"""`fisherguard evaluate`: detection quality on the evaluation half, as design.md §7 defines it.

Clean = evaluation images the model classifies correctly. Each attack runs on (a seeded subset
of) them; adversarial images are quantised to 8 bits and kept only if still misclassified. Per
attack and score: ROC-AUC (clean vs adversarial, bootstrap 95% interval), TPR at the calibrated
thresholds, the realised clean FPR, and the rate of attacks that succeed unflagged.
"""

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service import attacks
from service.bundle import Bundle
from service.calibration import Calibration
from service.data import Dataset
from service.fisher import SCORES
from service.scoring import score_batches

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Attack:
    name: str
    run: AttackFn


def parse_attack(spec: str) -> Attack:
    """`fgsm:0.1`, `pgd_linf:0.3`; ε may be written as a fraction such as 8/255."""
    kind, _, arg = spec.partition(":")
    try:
        eps: float | None = float(Fraction(arg)) if arg else None
    except ValueError:
        eps = None
    if kind == "fgsm" and eps is not None:
        return Attack(spec, lambda m, x, y: attacks.fgsm(m, x, y, eps))
    if kind == "pgd_linf" and eps is not None:
        return Attack(spec, lambda m, x, y: attacks.pgd_linf(m, x, y, eps))
    raise ValueError(f"unknown attack {spec!r}; known: fgsm:EPS, pgd_linf:EPS")


def roc_auc(clean: np.ndarray, adv: np.ndarray) -> float:
    """P(adv more unusual than clean) + ½ P(tie), with larger = more unusual."""
    both = np.concatenate([clean, adv])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]  # average ranks for ties
    return float((ranks[len(clean) :].sum() - len(adv) * (len(adv) + 1) / 2) / (len(clean) * len(adv)))


def bootstrap_auc(clean: np.ndarray, adv: np.ndarray, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    aucs = [roc_auc(rng.choice(clean, len(clean)), rng.choice(adv, len(adv))) for _ in range(reps)]
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def _unusual(name: str, v: np.ndarray) -> np.ndarray:
    return v if SCORES[name].direction == "high" else -v


def _batched(fn: AttackFn, model: nn.Module, x: Tensor, y: Tensor, batch: int) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat([fn(model, x[i : i + batch].to(device), y[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def _score_rows(cal: Calibration, clean: dict[str, np.ndarray], adv: dict[str, np.ndarray], alphas: Sequence[float]) -> dict[str, Any]:
    rows = {}
    for name in cal.values:
        c, a = clean[name], adv[name]
        pc, pa = cal.p_value(name, c), cal.p_value(name, a)
        lo, hi = bootstrap_auc(_unusual(name, c), _unusual(name, a))
        rows[name] = {
            "auc": roc_auc(_unusual(name, c), _unusual(name, a)),
            "auc_ci95": [lo, hi],
            **{f"tpr@{al}": float((pa <= al).mean()) for al in alphas},
            **{f"fpr@{al}": float((pc <= al).mean()) for al in alphas},
        }
    return rows


def evaluate(
    bundle: Bundle,
    data: Dataset,
    attack_list: Sequence[Attack],
    limit: int | None,
    alphas: Sequence[float] = (0.05, 0.01),
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """The report: clean FPR per score, and per attack its success, distortion and detection rows."""
    cal = bundle.calibration
    if cal is None:
        raise ValueError(f"bundle {bundle.name} has no calibration.json; run `fisherguard calibrate` first")
    names = sorted(cal.values)
    model = bundle.model
    clean, pred = score_batches(model, data.x, names, cal.score_options, batch_size, progress)
    ok = pred == data.y.numpy()
    clean = {k: v[ok] for k, v in clean.items()}
    x, y = data.x[ok], data.y[ok]
    if limit is not None and limit < len(x):
        pick = np.sort(np.random.default_rng(1).choice(len(x), limit, replace=False))
        x, y = x[pick], y[pick]
    report: dict[str, Any] = {
        "bundle": {"name": bundle.name, "version": bundle.card["version"], "weights_sha256": bundle.weights_sha256},
        "data": data.description,
        "calibration": cal.summary() | {"scores": None},
        "clean": {
            "n": int(ok.sum()),
            "decision_fpr": {str(a): float((cal.decision_p_value(clean[cal.statistic]) <= a).mean()) for a in alphas},
            "fpr": {k: {str(a): float((cal.p_value(k, v) <= a).mean()) for a in alphas} for k, v in clean.items()},
        },
        "attacked_images": len(x),
        "attacks": {},
    }
    for attack in attack_list:
        t0 = time.time()
        adv = attacks.quantise(_batched(attack.run, model, x, y, batch_size))
        with torch.no_grad():
            adv_pred = torch.cat(
                [model(adv[i : i + 256].to(next(model.parameters()).device)).argmax(1).cpu() for i in range(0, len(adv), 256)]
            )
        hit = adv_pred != y
        delta = (adv - x)[hit].flatten(1)
        adv_scores, _ = score_batches(model, adv[hit], names, cal.score_options, batch_size, progress)
        rows = _score_rows(cal, clean, adv_scores, alphas)
        pc, pa = cal.decision_p_value(clean[cal.statistic]), cal.decision_p_value(adv_scores[cal.statistic])
        stat = {f"tpr@{al}": float((pa <= al).mean()) for al in alphas} | {f"fpr@{al}": float((pc <= al).mean()) for al in alphas}
        report["attacks"][attack.name] = {
            "success_rate": float(hit.float().mean()),
            "n_successful": int(hit.sum()),
            "median_l2": float(delta.norm(dim=1).median()) if len(delta) else None,
            "median_linf": float(delta.abs().amax(1).median()) if len(delta) else None,
            "decision": stat,
            "unflagged_success_rate": {str(a): float(hit.float().mean()) * (1 - stat[f"tpr@{a}"]) for a in alphas},
            "scores": rows,
            "seconds": round(time.time() - t0, 1),
        }
    return report


def markdown(report: dict[str, Any], alphas: Sequence[float] = (0.05, 0.01)) -> str:
    lines = [
        f"# Detection report: {report['bundle']['name']}",
        "",
        f"Data: {report['data']}; clean evaluation images: {report['clean']['n']}; attacked: {report['attacked_images']}.",
        "",
    ]
    lines += [f"Decision statistic: `{report['calibration']['statistic']}` (calibration n = {report['calibration']['n']}).", ""]
    for name, a in report["attacks"].items():
        d = a["decision"]
        lines += [
            f"## {name}",
            "",
            f"success {a['success_rate']:.3f} ({a['n_successful']} images), median L2 {a['median_l2'] or float('nan'):.3f}, median L∞ {a['median_linf'] or float('nan'):.3f}",
            "",
        ]
        lines += [
            "Decision ("
            + report["calibration"]["tail"]
            + "): "
            + ", ".join(f"TPR@{al} {d[f'tpr@{al}']:.3f} (clean FPR {d[f'fpr@{al}']:.3f})" for al in alphas),
            "",
        ]
        head = "| score | AUC [95% CI] | " + " | ".join(f"TPR@{al} | FPR@{al}" for al in alphas) + " |"
        lines += [head, "|" + "---|" * (2 + 2 * len(alphas))]
        for s, r in sorted(a["scores"].items(), key=lambda kv: -kv[1]["auc"]):
            cells = " | ".join(f"{r[f'tpr@{al}']:.3f} | {r[f'fpr@{al}']:.3f}" for al in alphas)
            lines.append(f"| `{s}` | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | {cells} |")
        lines.append("")
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
