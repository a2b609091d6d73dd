"""The web page's gallery (`fisherguard examples`): clean evaluation images and adversarial versions
of them made by the project's own attacks, written as small PNGs with an index."""

import json
from pathlib import Path

import numpy as np

from service.core import decision
from service.core.bundle import Bundle
from service.core.images import encode_png
from service.core.scoring import score
from service.lab import attacks
from service.lab.data import Dataset
from service.serve.gallery import GALLERY


def make_gallery(bundle: Bundle, data: Dataset, eps: float, n: int = 4, out: Path | None = None) -> list[dict[str, object]]:
    """n clean images from the evaluation half with PGD-L∞ versions (ε = eps, 8-bit). It keeps the
    first n pairs in the seeded order whose attack succeeded, flagged or not, and says which."""
    cal = bundle.calibration
    assert cal is not None
    out = out or GALLERY / bundle.name
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(3).permutation(len(data.x))[: 8 * n]
    x, y = data.x[order], data.y[order]
    adv = attacks.quantise(attacks.pgd_linf(bundle.model, x, y, eps))
    rc, ra = (score(bundle, images, cal.decision_scores) for images in (x, adv))
    flags = {
        kind: decision.decide(cal, r.thresholded(), cal.alpha, r.predicted.numpy()).flagged for kind, r in (("clean", rc), ("pgd", ra))
    }
    entries: list[dict[str, object]] = []
    for i in range(len(x)):
        if len(entries) == 2 * n:
            break
        if int(rc.predicted[i]) != int(y[i]) or int(ra.predicted[i]) == int(y[i]):
            continue
        for kind, img in (("clean", x[i]), ("pgd", adv[i])):
            name = f"{len(entries) // 2:02d}-{kind}.png"
            (out / name).write_bytes(encode_png(img))
            entries.append(
                {
                    "file": name,
                    "kind": kind,
                    "true_label": bundle.classes[int(y[i])],
                    "attack": f"PGD-L∞ ε={_eps_text(eps)}, 40 steps, 8-bit" if kind == "pgd" else None,
                    "flagged_when_made": bool(flags[kind][i]),
                }
            )
    (out / "index.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def _eps_text(eps: float) -> str:
    """8/255 for ε = 0.0314, else the number as given."""
    steps = round(eps * 255)
    return f"{steps}/255" if steps and abs(eps * 255 - steps) < 1e-3 else f"{eps:g}"
