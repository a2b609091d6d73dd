"""`fisherguard inspect`: a model's Fisher geometry on clean data (Shi et al., arXiv 1906.02494; Zhao et al.).

- Shi et al.'s performance metric: the mean KL divergence KL(p(x_i) ‖ p(x_j)) over ordered pairs of
  images of different (true) classes, and its class × class table;
- the input Fisher G_x per image: λ_max(G_x), tr G_x, and λ_max / tr G_x, the fraction of the spectrum
  carried by the top eigenvalue (G_x has rank ≤ K − 1), summarised per class.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from service.core.batches import cat_batches, device_of
from service.core.bundle import Bundle
from service.core.scoring import score_dataset
from service.lab.data import Dataset

QUANTILES = (0.1, 0.5, 0.9)


def kl_matrix(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p_i ‖ q_j) = Σ_k p_ik (log p_ik − log q_jk) for every pair. (N, K), (M, K) -> (N, M)."""
    p = log_p.exp()  # (N, K)
    return (p * log_p).sum(1, keepdim=True) - p @ log_q.T  # (N, 1) − (N, M)


def class_pair_kl(log_p: Tensor, y: Tensor, classes: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of KL(p_i ‖ p_j) per (class of i, class of j), i ≠ j, in row blocks.
    log_p (N, K) float64 log-probabilities, y (N,) labels -> (C, C) sums, (C, C) pair counts."""
    onehot = torch.nn.functional.one_hot(y, classes).to(log_p.dtype)  # (N, C)
    sums = torch.zeros(classes, classes, dtype=log_p.dtype)
    for i in range(0, len(log_p), block):
        kl = kl_matrix(log_p[i : i + block], log_p)  # (B, N); the diagonal KL(p_i ‖ p_i) is 0
        sums += onehot[i : i + block].T @ kl @ onehot  # (C, C)
    counts = onehot.sum(0)[:, None] * onehot.sum(0)[None, :] - torch.diag(onehot.sum(0))  # ordered pairs, i ≠ j
    return sums.numpy(), counts.numpy()


def mean_between_class_kl(sums: np.ndarray, counts: np.ndarray) -> float:
    """Mean KL over ordered pairs of images whose classes differ (the off-diagonal of the table)."""
    off = ~np.eye(len(sums), dtype=bool)
    return float(sums[off].sum() / max(counts[off].sum(), 1))


def _summary(values: np.ndarray) -> dict[str, float]:
    q = np.quantile(values, QUANTILES) if len(values) else [float("nan")] * len(QUANTILES)
    return {"mean": float(values.mean()) if len(values) else float("nan")} | {
        f"q{int(a * 100)}": float(v) for a, v in zip(QUANTILES, q, strict=True)
    }


def log_probs(bundle: Bundle, x: Tensor, batch: int = 512) -> Tensor:
    """float64 log-softmax of the logits. (N, C, H, W) -> (N, K)."""
    with torch.no_grad():
        return cat_batches(lambda xb: torch.log_softmax(bundle.model(xb).double(), 1), x, batch=batch, device=device_of(bundle.model))


def inspect(bundle: Bundle, data: Dataset, batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """The geometry report of one bundle on one labelled clean set (all images, correct or not)."""
    log_p = log_probs(bundle, data.x)
    k = log_p.shape[1]
    sums, counts = class_pair_kl(log_p, data.y, k)
    scores, pred = score_dataset(bundle, data.x, ("fisher_input_eig", "fisher_input_trace"), batch_size, progress, opts={})  # all K classes
    eig, trace = 10.0 ** scores["fisher_input_eig"], 10.0 ** scores["fisher_input_trace"]  # raw values
    top = eig / np.maximum(trace, 1e-300)
    y = data.y.numpy()
    per_class = {
        name: {
            "n": int((y == c).sum()),
            "accuracy": float((pred[y == c] == c).mean()) if (y == c).any() else float("nan"),
            "log10_lambda_max": _summary(np.log10(np.maximum(eig[y == c], 1e-30))),
            "log10_trace": _summary(np.log10(np.maximum(trace[y == c], 1e-30))),
            "top_fraction": _summary(top[y == c]),
            "kl_to_other_classes": float(sums[c][np.arange(k) != c].sum() / max(counts[c][np.arange(k) != c].sum(), 1)),
        }
        for c, name in enumerate(bundle.classes)
    }
    return {
        "bundle": {
            "name": bundle.name,
            "version": bundle.card.get("version"),
            "weights_sha256": bundle.weights_sha256,
            "test_accuracy": bundle.card.get("test_accuracy"),
            "training": bundle.card.get("training", {}),
        },
        "data": data.description,
        "n": len(y),
        "accuracy": float((pred == y).mean()),
        "mean_between_class_kl": mean_between_class_kl(sums, counts),
        "class_kl": (sums / np.maximum(counts, 1)).tolist(),
        "log10_lambda_max": _summary(np.log10(np.maximum(eig, 1e-30))),
        "log10_trace": _summary(np.log10(np.maximum(trace, 1e-30))),
        "top_fraction": _summary(top),
        "per_class": per_class,
        "values": {"log10_lambda_max": scores["fisher_input_eig"].tolist(), "top_fraction": top.tolist(), "label": y.tolist()},
    }


def markdown(reports: Sequence[dict[str, Any]]) -> str:
    """One comparison table over the bundles, then per bundle the per-class table."""
    lines = ["# Fisher geometry report", "", f"Data: {reports[0]['data']} ({reports[0]['n']} images).", ""]
    lines += [
        "| bundle | accuracy | mean KL between classes | median log10 λ_max | median log10 tr G_x | median λ_max / tr |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        lines.append(
            f"| {r['bundle']['name']} | {r['accuracy']:.4f} | {r['mean_between_class_kl']:.3f} | {r['log10_lambda_max']['q50']:.2f}"
            f" | {r['log10_trace']['q50']:.2f} | {r['top_fraction']['q50']:.3f} |"
        )
    lines += [
        "",
        "KL: mean of KL(p(x_i) ‖ p(x_j)) over ordered pairs of images of different true classes (Shi et al.'s metric; larger means"
        " the classes are further apart in prediction space). λ_max and tr are of the input Fisher G_x with inputs in [0, 1];"
        " λ_max / tr is the share of the spectrum in the top eigenvalue (rank G_x ≤ K − 1).",
        "",
    ]
    for r in reports:
        lines += [
            f"## {r['bundle']['name']}",
            "",
            "| class | n | accuracy | KL to other classes | log10 λ_max q10 / q50 / q90 | log10 tr q50 | λ_max / tr q50 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in r["per_class"].items():
            lam = c["log10_lambda_max"]
            lines.append(
                f"| {name} | {c['n']} | {c['accuracy']:.4f} | {c['kl_to_other_classes']:.3f} | {lam['q10']:.2f} / {lam['q50']:.2f} / {lam['q90']:.2f}"
                f" | {c['log10_trace']['q50']:.2f} | {c['top_fraction']['q50']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(reports: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """lambda-max-by-class.png (box plots, bundles side by side) and top-fraction.png (histograms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(reports[0]["per_class"])
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(classes) * len(reports)), 4))
    for i, r in enumerate(reports):
        lam, label = np.array(r["values"]["log10_lambda_max"]), np.array(r["values"]["label"])
        pos = np.arange(len(classes)) + (i - (len(reports) - 1) / 2) * width
        box = ax.boxplot(
            [lam[label == c] for c in range(len(classes))], positions=pos, widths=width * 0.9, showfliers=False, patch_artist=True
        )
        for patch in box["boxes"]:
            patch.set_facecolor(f"C{i}")
        ax.plot([], [], color=f"C{i}", linewidth=6, label=r["bundle"]["name"])
    ax.set_xticks(range(len(classes)), classes, rotation=30 if len(classes[0]) > 2 else 0)
    ax.set(ylabel="log10 λ_max(G_x)", title="Largest eigenvalue of the input Fisher, clean images by class")
    ax.legend()
    fig.tight_layout()
    paths = [out / "lambda-max-by-class.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(reports):
        ax.hist(r["values"]["top_fraction"], bins=40, range=(0, 1), alpha=0.5, color=f"C{i}", label=r["bundle"]["name"])
    ax.set(xlabel="λ_max / tr G_x", ylabel="images", title="Share of the input Fisher spectrum in the top eigenvalue")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "top-fraction.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def write(reports: Sequence[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summaries = [{k: v for k, v in r.items() if k != "values"} for r in reports]  # per-image values only feed the plots
    (out / "inspect.json").write_text(json.dumps(summaries, indent=1) + "\n")
    (out / "inspect.md").write_text(markdown(reports))
    plot(reports, out)
