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

from service import adaptive, attacks
from service.baselines import KNOWN
from service.bundle import Bundle
from service.calibration import Component, conformal_p_value
from service.data import Dataset
from service.scoring import score_batches

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Attack:
    name: str
    run: AttackFn
    control: bool = False  # a benign change of clean images (noise, JPEG): all kept, flag rate ≈ α expected


def _number(arg: str) -> float:
    try:
        return float(Fraction(arg))
    except ValueError:
        raise ValueError(f"{arg!r} is not a number (fractions such as 8/255 are fine)") from None


def _uniform_noise(x: Tensor, eps: float) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return (x + (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * eps).clamp(0, 1)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    import io

    from PIL import Image

    out = []
    for img in (x.clamp(0, 1) * 255).round().byte().cpu():
        arr = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, "JPEG", quality=quality)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        out.append(torch.from_numpy(dec.reshape(arr.shape)).permute(2, 0, 1))
    return torch.stack(out).to(x.device)


ATTACK_HELP = (
    "fgsm:EPS, pgd_linf:EPS, pgd_l2:EPS, cw:KAPPA, deepfool, square:EPS, ossa:EPS, adaptive:EPS[:KAPPA], adaptive_l2:EPS[:KAPPA] "
    "(controls: noise:EPS, jpeg:QUALITY); EPS may be a fraction such as 8/255"
)


def parse_attack(spec: str, bundle: Bundle | None = None) -> Attack:
    """An attack (or control) from its command-line spec; see ATTACK_HELP."""
    kind, _, arg = spec.partition(":")
    if kind in ("adaptive", "adaptive_l2") and arg.count(":") == 1:  # with the logit margin κ the attacker asks for
        eps, kappa = (_number(a) for a in arg.split(":"))
        return Attack(spec, _adaptive(bundle, eps, "l2" if kind == "adaptive_l2" else "linf", kappa))
    v = _number(arg) if arg else None
    table: dict[str, Callable[[float], Attack]] = {
        "fgsm": lambda e: Attack(spec, lambda m, x, y: attacks.fgsm(m, x, y, e)),
        "pgd_linf": lambda e: Attack(spec, lambda m, x, y: attacks.pgd_linf(m, x, y, e)),
        "pgd_l2": lambda e: Attack(spec, lambda m, x, y: attacks.pgd_l2(m, x, y, e)),
        "cw": lambda k: Attack(spec, lambda m, x, y: attacks.cw_l2(m, x, y, kappa=k)),
        "square": lambda e: Attack(spec, lambda m, x, y: attacks.square_linf(m, x, y, e)),
        "ossa": lambda e: Attack(spec, lambda m, x, y: attacks.ossa(m, x, y, e)),
        "adaptive": lambda e: Attack(spec, _adaptive(bundle, e, "linf", 2.0)),
        "adaptive_l2": lambda e: Attack(spec, _adaptive(bundle, e, "l2", 2.0)),
        "noise": lambda e: Attack(spec, lambda m, x, y: _uniform_noise(x, e), control=True),
        "jpeg": lambda q: Attack(spec, lambda m, x, y: _jpeg(x, int(q)), control=True),
    }
    if kind == "deepfool" and v is None:
        return Attack(spec, lambda m, x, y: attacks.deepfool(m, x, y))
    if kind in table and v is not None:
        return table[kind](v)
    raise ValueError(f"unknown attack {spec!r}; known: {ATTACK_HELP}")


def _adaptive(bundle: Bundle | None, eps: float, norm: str, kappa: float) -> AttackFn:
    """PGD (L∞ or L2) against the bundle's whole decision: every component held inside its clean range."""
    cal = bundle.calibration if bundle else None
    if bundle is None or cal is None:
        raise ValueError("the adaptive attack needs a calibrated bundle: it attacks the bundle's decision")
    components = cal.combination.components if cal.combination else (Component(cal.statistic, cal.tail),)
    penalty = adaptive.decision_penalty(adaptive.targets(cal.values, components, bundle.mahalanobis))
    return lambda m, x, y: attacks.adaptive_pgd(m, x, y, eps, penalty, kappa=kappa, norm=norm)


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


def roc_points(clean: np.ndarray, adv: np.ndarray, n: int = 51) -> list[list[float]]:
    """[FPR, TPR] at n thresholds spread over the quantiles of both sets (larger = more unusual)."""
    thresholds = np.unique(np.quantile(np.concatenate([clean, adv]), np.linspace(0, 1, n)))[::-1]
    fpr = [float((clean >= t).mean()) for t in thresholds]
    tpr = [float((adv >= t).mean()) for t in thresholds]
    return [[0.0, *fpr, 1.0], [0.0, *tpr, 1.0]]


def bootstrap_auc(clean: np.ndarray, adv: np.ndarray, reps: int = 200, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    aucs = [roc_auc(rng.choice(clean, len(clean)), rng.choice(adv, len(adv))) for _ in range(reps)]
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


ALPHAS = (0.05, 0.01)  # the α a report measures TPR at: the goal and the service's default


def predict(model: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    """Predicted classes of x (N, C, H, W) in batches on the model's device, without gradients. -> (N,) on CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(x), batch)])


def _batched(fn: AttackFn, model: nn.Module, x: Tensor, y: Tensor, batch: int) -> Tensor:
    device = next(model.parameters()).device
    return torch.cat([fn(model, x[i : i + batch].to(device), y[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def _rows(
    cal: dict[str, np.ndarray], direction: dict[str, str], clean: dict[str, np.ndarray], adv: dict[str, np.ndarray], alphas: Sequence[float]
) -> dict[str, Any]:
    """Per score: AUC with a bootstrap interval, and TPR / realised FPR at conformal thresholds."""
    rows = {}
    for name in cal:
        c, a = clean[name], adv[name]
        pc, pa = conformal_p_value(cal[name], c, direction[name]), conformal_p_value(cal[name], a, direction[name])
        sign = 1.0 if direction[name] == "high" else -1.0
        lo, hi = bootstrap_auc(sign * c, sign * a)
        rows[name] = {
            "auc": roc_auc(sign * c, sign * a),
            "auc_ci95": [lo, hi],
            "roc": roc_points(sign * c, sign * a),
            **{f"tpr@{al}": float((pa <= al).mean()) for al in alphas},
            **{f"fpr@{al}": float((pc <= al).mean()) for al in alphas},
        }
    return rows


Baseline = Callable[[nn.Module, Tensor], Tensor]


def _baseline_values(model: nn.Module, x: Tensor, baselines: dict[str, Baseline], batch: int) -> dict[str, np.ndarray]:
    device = next(model.parameters()).device
    return {
        k: torch.cat([fn(model, x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)]).numpy() for k, fn in baselines.items()
    }


def evaluate(
    bundle: Bundle,
    data: Dataset,
    attack_list: Sequence[Attack],
    limit: int | None,
    alphas: Sequence[float] = ALPHAS,
    batch_size: int = 64,
    progress: bool = False,
    baselines: dict[str, Baseline] | None = None,
    baseline_calibration: Dataset | None = None,
) -> dict[str, Any]:
    """The report: clean FPR per score, and per attack its success, distortion and detection rows."""
    cal = bundle.calibration
    if cal is None:
        raise ValueError(f"bundle {bundle.name} has no calibration.json; run `fisherguard calibrate` first")
    names = sorted(cal.values)
    model = bundle.model
    baselines = baselines or {}
    baselines = {k: v for k, v in baselines.items() if k not in cal.values}  # the calibrated ones are scored with the rest
    clean, pred = score_batches(model, data.x, names, cal.score_options, batch_size, progress, bundle.mahalanobis)
    ok = pred == data.y.numpy()
    x, y = data.x[ok], data.y[ok]
    clean = {k: v[ok] for k, v in clean.items()} | _baseline_values(model, x, baselines, batch_size)
    cal_values = dict(cal.values)
    direction: dict[str, str] = {k: str(KNOWN[k].direction) for k in names} | {k: "high" for k in baselines}
    if baselines and baseline_calibration is not None:  # the baselines' own clean calibration, same half as the bundle's
        bx, by = baseline_calibration.x, baseline_calibration.y
        keep = predict(model, bx) == by
        cal_values |= {k: np.sort(v) for k, v in _baseline_values(model, bx[keep], baselines, batch_size).items()}
    if limit is not None and limit < len(x):
        pick = np.sort(np.random.default_rng(1).choice(len(x), limit, replace=False))
        x, y = x[pick], y[pick]
    per_image: dict[str, np.ndarray] = {f"clean/{k}": v for k, v in clean.items()} | {f"calibration/{k}": v for k, v in cal_values.items()}
    report: dict[str, Any] = {
        "per_image": per_image,  # thresholded-form values per image, for offline analysis (write() puts them in scores.npz)
        "bundle": {"name": bundle.name, "version": bundle.card["version"], "weights_sha256": bundle.weights_sha256},
        "data": data.description,
        "calibration": cal.summary() | {"scores": None},
        "baselines": sorted(baselines),
        "clean": {
            "n": int(ok.sum()),
            "decision_fpr": {str(a): float((cal.decision_p_value(clean) <= a).mean()) for a in alphas},
            "fpr": {
                k: {str(a): float((conformal_p_value(cal_values[k], clean[k], direction[k]) <= a).mean()) for a in alphas}
                for k in cal_values
            },
        },
        "attacked_images": len(x),
        "attacks": {},
    }
    for attack in attack_list:
        t0 = time.time()
        adv = attacks.quantise(_batched(attack.run, model, x, y, batch_size))
        adv_pred = predict(model, adv)
        hit = torch.ones_like(y, dtype=torch.bool) if attack.control else adv_pred != y  # controls keep every image
        delta = (adv - x)[hit].flatten(1)
        adv_scores, _ = score_batches(model, adv[hit], names, cal.score_options, batch_size, progress, bundle.mahalanobis)
        adv_scores |= _baseline_values(model, adv[hit], baselines, batch_size)
        per_image |= {f"{attack.name}/{k}": v for k, v in adv_scores.items()}
        rows = _rows(cal_values, direction, clean, adv_scores, alphas)
        pc, pa = cal.decision_p_value(clean), cal.decision_p_value(adv_scores)
        stat = {f"tpr@{al}": float((pa <= al).mean()) for al in alphas} | {f"fpr@{al}": float((pc <= al).mean()) for al in alphas}
        stat["auc"] = roc_auc(-cal.decision_rank(clean), -cal.decision_rank(adv_scores)) if len(pa) else float("nan")
        report["attacks"][attack.name] = {
            "control": attack.control,
            "success_rate": float((adv_pred != y).float().mean()),
            "n_successful": int(hit.sum()),
            "median_l2": float(delta.norm(dim=1).median()) if len(delta) else None,
            "median_linf": float(delta.abs().amax(1).median()) if len(delta) else None,
            "decision": stat,
            "unflagged_success_rate": {str(a): float((adv_pred != y).float().mean()) * (1 - stat[f"tpr@{a}"]) for a in alphas},
            "flag_rate_by_predicted_class": _flags_by_class(pa, adv_pred[hit].numpy(), alphas[0]),
            "scores": rows,
            "seconds": round(time.time() - t0, 1),
        }
    return report


def _flags_by_class(p: np.ndarray, predicted: np.ndarray, alpha: float) -> dict[str, float]:
    return {str(c): float((p[predicted == c] <= alpha).mean()) for c in np.unique(predicted)}


def markdown(report: dict[str, Any], alphas: Sequence[float] = ALPHAS) -> str:
    lines = [
        f"# Detection report: {report['bundle']['name']}",
        "",
        f"Data: {report['data']}; clean evaluation images: {report['clean']['n']}; attacked: {report['attacked_images']}.",
        "",
    ]
    parts = report["calibration"].get("components")
    named = ", ".join(f"`{c['score']}` ({c['tail']})" for c in parts or [])
    combo = f" = the smallest p-value of {named}, itself calibrated" if parts else ""
    lines += [f"Decision statistic: `{report['calibration']['statistic']}`{combo} (calibration n = {report['calibration']['n']}).", ""]
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
            + ", ".join(f"TPR@{al} {d[f'tpr@{al}']:.3f} (clean FPR {d[f'fpr@{al}']:.3f})" for al in alphas)
            + (f", ROC-AUC {d['auc']:.3f}" if "auc" in d else ""),
            "",
            f"Flag rate at α = {alphas[0]} by predicted class: "
            + ", ".join(f"{c}: {v:.3f}" for c, v in a.get("flag_rate_by_predicted_class", {}).items()),
            "",
        ]
        head = "| score | AUC [95% CI] | " + " | ".join(f"TPR@{al} | FPR@{al}" for al in alphas) + " |"
        lines += [head, "|" + "---|" * (2 + 2 * len(alphas))]
        for s, r in sorted(a["scores"].items(), key=lambda kv: -kv[1]["auc"]):
            cells = " | ".join(f"{r[f'tpr@{al}']:.3f} | {r[f'fpr@{al}']:.3f}" for al in alphas)
            lines.append(f"| `{s}` | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot_roc(report: dict[str, Any], out: Path, top: int = 6) -> None:
    """One PNG of ROC curves per attack (the best `top` scores and every baseline); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[eval]'): no ROC plots")
        return
    for name, a in report["attacks"].items():
        rows = sorted(a["scores"].items(), key=lambda kv: -kv[1]["auc"])
        shown = rows[:top] + [kv for kv in rows[top:] if kv[0] in report.get("baselines", [])]
        fig, ax = plt.subplots(figsize=(5, 5))
        for score, r in shown:
            ax.plot(
                r["roc"][0], r["roc"][1], label=f"{score} ({r['auc']:.3f})", linestyle="--" if score in report.get("baselines", []) else "-"
            )
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
        ax.set(xlabel="clean false-positive rate", ylabel="adversarial true-positive rate", title=f"{report['bundle']['name']}: {name}")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"roc-{name.replace(':', '_').replace('/', '-')}.png", dpi=100)
        plt.close(fig)


def write(report: dict[str, Any], out: Path) -> None:
    """report.json, report.md, and scores.npz (every image's score values, keyed attack/score)."""
    out.mkdir(parents=True, exist_ok=True)
    per_image = report.get("per_image", {})
    np.savez_compressed(out / "scores.npz", **per_image)  # type: ignore[arg-type]
    report = {k: v for k, v in report.items() if k != "per_image"}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
