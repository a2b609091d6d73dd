"""Attacks against candidate decisions on the calibration half (docs/detection.md#choosing-a-decision).

    python -m bench.adaptive_choice --bundles models/mnist,/tmp/mnist-previous --attacks adaptive:0.3:10,adaptive_l2:3:10 \
      --limit 100 --out bench/results/adaptive-choice-mnist

For each bundle directory (the same weights, different detectors or calibrations): each attack spec
(the harness's adaptive attack is run against that bundle's own decision) on a seeded subset of the
correctly classified part-B images, 8-bit quantised as every attack is; the share that ends
misclassified *and* unflagged at α = 0.05 and 0.01, the share flagged (for a benign control, its
flag rate), and for a benign control the share flagged among the images the classifier still reads
right (its false alarms: a brightened digit the classifier now misreads is one the decision should
flag). Only the attacked images are scored (not the whole clean half), so a comparison costs
minutes.
"""

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write
from service.cli.common import default_data
from service.core import decision
from service.core.bundle import load_bundle
from service.core.scoring import predict, score
from service.lab.attack_specs import parse_attack
from service.lab.attacks import quantise
from service.lab.data import load_dataset, seeded_pick
from service.lab.evaluate import ALPHAS
from service.lab.learn import correct


def measure(path: str, attacks: list[str], limit: int) -> dict[str, Any]:
    bundle = load_bundle(path)
    cal = bundle.calibration
    assert cal is not None, f"{path} is not calibrated"
    data = correct(bundle, load_dataset(default_data(bundle.card), "calibration-b", bundle.classes, bundle.input))
    pick = torch.from_numpy(seeded_pick(len(data.y), limit))
    x, y = data.x[pick], data.y[pick]
    out: dict[str, Any] = {"bundle": path, "decision": list(cal.decision_scores), "images": len(y), "attacks": {}}
    for spec in attacks:
        t0 = time.time()
        attack = parse_attack(spec, bundle)
        adv = quantise(attack.run(bundle.model, x, y))
        wrong = (predict(bundle, adv) != y).numpy()
        scored = score(bundle, adv, cal.decision_scores)
        row: dict[str, Any] = {"success": float(wrong.mean()), "seconds": round(time.time() - t0, 1)}
        for alpha in ALPHAS:
            flagged = decision.decide(cal, scored.thresholded(), alpha, scored.predicted.numpy()).flagged
            row[f"unflagged_success@{alpha}"] = float((wrong & ~flagged).mean())
            row[f"flagged@{alpha}"] = float(flagged.mean())
            if attack.control:  # its false alarms
                row[f"flagged_still_right@{alpha}"] = float(flagged[~wrong].mean()) if (~wrong).any() else None
        out["attacks"][spec] = row
        print(path, spec, row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--bundles", required=True, help="comma list of bundle directories or names")
    ap.add_argument("--attacks", required=True, help="comma list of attack or control specs")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [measure(b, a.attacks.split(","), a.limit) for b in a.bundles.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "adaptive.json", {"environment": environment("cpu"), "limit": a.limit, "rows": rows})


if __name__ == "__main__":
    main()
