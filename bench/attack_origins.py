"""Where an attack's successes start from, and how the shipped detector catches them by that: a part-B
study (docs/detection.md#detector-options).

    python -m bench.attack_origins --model cifar10 --attacks fgsm:4/255,ossa:0.5 --out bench/results/attack-origins-cifar10

Part B's clean, correctly classified images are split into quartiles of their margin (the log-odds s
of ŷ). For each attack, on part B's seeded `limit` images as `fisherguard fit-detector` runs it (the
same cached images), per quartile of the starting image: the attack's success rate, the share of all
successes that start there, and the bundle's learned detector's TPR at α on them, its thresholds from
the clean part-B scores (conformal p-values, as fit-detector's report measures). An attack whose
successes pile up in the lowest quartile flips what the classifier was already unsure of; the
detector's rate there against the other quartiles says whether those are what it misses.
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
from service.core.scoring import predict
from service.lab import learn
from service.lab.attack_specs import parse_attack
from service.lab.data import load_dataset, seeded_pick
from service.lab.evaluate import ALPHAS, cached_attack


def quartile(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The quartile (0–3) of each value against the three edges (N,) -> (N,)."""
    return np.digitize(values, edges)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--attacks", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path(".cache/attacks"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model)
    detector = bundle.detector
    if detector is None:
        raise SystemExit(f"{a.model}: the bundle has no learned detector")
    part = learn.correct(bundle, load_dataset(default_data(bundle.card), "calibration-b", bundle.classes, bundle.input))
    clean = learn.cached_features(bundle, part.x, detector.spec, a.cache, learn.clean_key(bundle, part))
    reference = np.sort(detector.logit(learn.raw(clean)).numpy())
    edges = np.quantile(clean["margin"], [0.25, 0.5, 0.75])
    pick = torch.from_numpy(seeded_pick(len(part.y), a.limit))
    x, y = part.x[pick], part.y[pick]
    start = quartile(clean["margin"][pick.numpy()], edges)  # (limit,) the starting images' quartiles
    rows: dict[str, Any] = {}
    for spec in a.attacks.split(","):
        attack = parse_attack(spec, bundle)
        adv, _, key = cached_attack(bundle, attack, x, y, a.cache, 100)
        ok = (predict(bundle, adv) != y).numpy()
        table = learn.cached_features(bundle, adv[ok], detector.spec, a.cache, key)  # fit-detector's key for these images
        p = conformal_p_value(reference, detector.logit(learn.raw(table)).numpy(), "high")
        rows[spec] = {
            "n": int(ok.sum()),
            "quartiles": [
                {"images": int((start == q).sum()), "success_rate": float(ok[start == q].mean()), "successes": int((start[ok] == q).sum())}
                | {f"tpr@{alpha}": float((p[start[ok] == q] <= alpha).mean()) if (start[ok] == q).any() else None for alpha in ALPHAS}
                for q in range(4)
            ],
        }
        print(spec, rows[spec])
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "origins.json", {"environment": environment("cpu"), "model": a.model, "margin_quartiles": edges.tolist(), "rows": rows})
    (a.out / "origins.md").write_text(markdown(rows, edges))
    print(markdown(rows, edges))


def markdown(rows: dict[str, Any], edges: np.ndarray) -> str:
    lines = [
        "# Where the attacks' successes start from (part B)",
        "",
        f"Quartiles of the starting image's margin among part B's clean images (edges {', '.join(f'{e:.3f}' for e in edges)}; "
        "Q1 the least sure). Each cell: success rate · share of the successes · the learned detector's TPR @ 0.05 / 0.01 on them.",
        "",
        "| attack | successes | Q1 | Q2 | Q3 | Q4 |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for spec, r in rows.items():
        cells = [
            f"{q['success_rate']:.2f} · {q['successes'] / max(r['n'], 1):.2f} · {fmt(q['tpr@0.05'])} / {fmt(q['tpr@0.01'])}"
            for q in r["quartiles"]
        ]
        lines.append(f"| {spec} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
