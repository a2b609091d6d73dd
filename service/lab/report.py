"""An evaluation report as files: report.json, report.md, scores.npz (every image's values) and ROC plots.

`python -m service.lab.report DIR ...` writes each DIR's report.md again from its report.json (the
markdown is a function of the JSON alone), so a committed report gains a later column without a new run.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.lab.evaluate import ALPHAS
from service.lab.stats import rate_interval


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
    lines += summary(report, alphas)
    for name, a in report["attacks"].items():
        d = a["decision"]
        known = {True: " (a family the detector was trained on)", False: " (a family the detector never saw)"}.get(a.get("seen"), "")
        lines += [
            f"## {name}{known}",
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


def kind(attack: dict[str, Any]) -> str:
    """`adaptive`, else whether the detector was trained on the family (`seen`/`unseen`), controls apart."""
    if attack.get("family") == "adaptive":
        return "adaptive"
    seen = attack.get("seen")
    trained = "" if seen is None else "seen" if seen else "unseen"
    return f"control {trained}".strip() if attack["control"] else trained or "attack"


def summary(report: dict[str, Any], alphas: Sequence[float] = ALPHAS) -> list[str]:
    """One row per attack (for a control the TPR cells are its flag rate), then the mean TPR per kind
    over the attacks with at least one successful image."""
    fpr = report["clean"]["decision_fpr"]
    lines = ["## Summary", "", "Clean FPR of the decision: " + ", ".join(f"{fpr[str(a)]:.3f} at α = {a}" for a in alphas) + ".", ""]
    tpr = " | ".join(f"TPR@{a}" for a in alphas)
    lines += [
        f"| attack | kind | success | n | AUC | {tpr} | 95% interval @{alphas[0]} | succeeds unflagged @{alphas[0]} |",
        "|" + "---|" * (7 + len(alphas)),
    ]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for name, a in report["attacks"].items():
        d, k, control = a["decision"], kind(a), a["control"]
        success = "—" if control else f"{a['success_rate']:.3f}"
        if a["n_successful"] == 0:
            lines.append(f"| {name} | {k} | {success} | 0 | — |" + " — |" * (1 + len(alphas)) + " 0.000 |")
            continue
        by_kind.setdefault(k, []).append(d)
        unflagged = "—" if control else f"{a['unflagged_success_rate'][str(alphas[0])]:.3f}"
        cells = " | ".join(f"{d[f'tpr@{al}']:.3f}" for al in alphas)
        ci = interval(d[f"tpr@{alphas[0]}"], a["n_successful"])
        lines.append(
            f"| {name} | {k} | {success} | {a['n_successful']} | {d.get('auc', float('nan')):.3f} | {cells} | {ci} | {unflagged} |"
        )
    lines.append("")
    for k, rows in by_kind.items():
        means = ", ".join(f"{np.mean([r[f'tpr@{al}'] for r in rows]):.3f} at α = {al}" for al in alphas)
        first = [r[f"tpr@{alphas[0]}"] for r in rows]
        control = k.startswith("control")
        worst = f"highest at α = {alphas[0]}: {max(first):.3f}" if control else f"lowest at α = {alphas[0]}: {min(first):.3f}"
        lines.append(f"- {k} ({len(rows)}): mean {'flag rate' if control else 'TPR'} {means}; {worst}")
    return [*lines, "", *false_alarms(report, alphas)]


def false_alarms(report: dict[str, Any], alphas: Sequence[float] = ALPHAS) -> list[str]:
    """Per benign control: the share of changed images the classifier misreads, the flag rate, and the
    flag rate among the images it still reads right (the control's false alarms); none for older reports."""
    rows = [(n, a) for n, a in report["attacks"].items() if a["control"] and a.get("still_right")]
    if not rows:
        return []
    flagged = " / ".join(f"@{a}" for a in alphas)
    lines = [
        "Benign controls, split by whether the classifier still reads the changed image right (flagging a misread one is no false alarm):",
        "",
    ]
    unchanged = report.get("attacked_unchanged")
    if unchanged:  # the same images before the change: a control's rate on a small subset is measured against theirs
        flags = " / ".join(f"{unchanged[f'flagged@{al}']:.3f}" for al in alphas)
        lines += [f"The {report['attacked_images']} images the controls change are flagged unchanged at {flags}.", ""]
    added = all(a.get("added") for _, a in rows)  # older reports lack each control's own flags
    lines += [
        f"| control | misread | flagged {flagged} | still read right | flagged among them {flagged} | 95% interval among them @{alphas[0]} |"
        + (f" flagged changed, not unchanged {flagged} |" if added else ""),
        "|---|---|---|---|---|---|" + ("---|" if added else ""),
    ]
    rates = lambda r: " / ".join(f"{r[f'flagged@{al}']:.3f}" for al in alphas)  # noqa: E731
    for name, a in rows:
        raw = " / ".join(f"{a['decision'][f'tpr@{al}']:.3f}" for al in alphas)
        right = a["still_right"]
        among = " / ".join("—" for _ in alphas) if right["n"] == 0 else rates(right)
        ci = "—" if right["n"] == 0 else interval(right[f"flagged@{alphas[0]}"], right["n"])
        own = f" {rates(a['added'])} |" if added else ""
        lines.append(f"| {name} | {a['success_rate']:.3f} | {raw} | {right['n']} | {among} | {ci} |{own}")
    return [*lines, ""]


def interval(rate: float, n: int) -> str:
    """The exact 95% interval (service.lab.stats.rate_interval) of a rate measured on n images, `lo–hi`:
    on 80 images a flag rate of 0.100 reads 0.044–0.188, on 2000 images 0.087–0.114."""
    lo, hi = rate_interval(round(rate * n), n)
    return f"{lo:.3f}–{hi:.3f}"


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


def rerender(out: Path) -> None:
    """report.md again from out/report.json."""
    (out / "report.md").write_text(markdown(json.loads((out / "report.json").read_text())))


if __name__ == "__main__":
    import sys

    for d in sys.argv[1:]:
        rerender(Path(d))
