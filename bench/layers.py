"""Which hidden layers the multi-layer Mahalanobis score should use, measured on the *calibration* half.

For every stage output (`service.baselines.stage_outputs`) and the penultimate features: the
single-layer Mahalanobis distance d_l (fitted on seeded training images), its ROC-AUC clean vs each
attack, and the share of each attack and control above the clean 95% quantile (flag rate at 5%).
A layer that flags the controls (uniform noise, JPEG) detects perturbations, not adversarial ones:

    python -m bench.layers --model mnist --attacks cw:20,pgd_l2:2,noise:0.1,jpeg:50 --limit 200 --out bench/results/layers-mnist
"""

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import environment, write
from service.core.baselines import PENULTIMATE, Mahalanobis, features, stage_outputs
from service.core.batches import cat_dicts, map_batches
from service.core.bundle import load_bundle
from service.core.scoring import predict
from service.lab.attack_specs import parse_attack
from service.lab.data import load_dataset, load_train_subset, seeded_pick
from service.lab.evaluate import run_attack
from service.lab.stats import roc_auc


def distances(fit: Mahalanobis, model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> dict[str, np.ndarray]:
    """layer -> d_l(x) (N,) for every fitted layer."""
    taps = [k for k in fit.layers if k != PENULTIMATE]
    f = cat_dicts(map_batches(lambda xb: features(model, xb, taps), x, batch=batch))  # layer -> (N, F_l)
    return {k: g.distance(f[k]).numpy() for k, (g, _) in fit.layers.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--data", type=Path, required=True, help="npz with the train and test splits")
    ap.add_argument("--attacks", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    bundle = load_bundle(a.model)
    model = bundle.model.eval()
    data = load_dataset(a.data, "calibration", bundle.classes, bundle.input)
    ok = predict(model, data.x) == data.y
    x, y = data.x[ok], data.y[ok]
    fit = Mahalanobis.fit(model, *load_train_subset(a.data, a.train_subset), taps=stage_outputs(model, x))
    clean = distances(fit, model, x)
    q95 = {k: float(np.quantile(v, 0.95)) for k, v in clean.items()}
    pick = seeded_pick(len(x), a.limit)
    xa, ya = x[pick], y[pick]
    rows: dict[str, Any] = {}
    for spec in a.attacks.split(","):
        attack, t0 = parse_attack(spec, bundle), time.time()
        adv = run_attack(attack, bundle, xa, ya, 100)
        hit = torch.ones(len(adv), dtype=torch.bool) if attack.control else predict(model, adv) != ya
        d = distances(fit, model, adv[hit])
        rows[spec] = {
            "control": attack.control,
            "n": int(hit.sum()),
            "auc": {k: roc_auc(clean[k], v) for k, v in d.items()},
            "flag@0.05": {k: float((v > q95[k]).mean()) for k, v in d.items()},
        }
        print(spec, {k: f"{rows[spec]['auc'][k]:.3f}/{rows[spec]['flag@0.05'][k]:.3f}" for k in d}, f"{time.time() - t0:.0f}s", flush=True)
    layers = list(fit.layers)
    lines = [
        f"# Single-layer Mahalanobis on the calibration half ({bundle.name}, {len(x)} clean, {len(xa)} attacked)",
        "",
        "ROC-AUC / flag rate above the clean 95% quantile, per layer (module name; `penultimate` = input of the last linear).",
        "",
        "| attack | n | " + " | ".join(f"`{k}`" for k in layers) + " |",
        "|" + "---|" * (2 + len(layers)),
    ]
    for spec, r in rows.items():
        cells = " | ".join(f"{r['auc'][k]:.3f} / {r['flag@0.05'][k]:.3f}" for k in layers)
        lines.append(f"| {spec}{' (control)' if r['control'] else ''} | {r['n']} | {cells} |")
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "layers.json", {"environment": environment("cpu"), "bundle": bundle.name, "layers": layers, "attacks": rows})
    (a.out / "layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
