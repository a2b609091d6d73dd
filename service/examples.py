"""The web page's gallery: clean evaluation images and adversarial versions of them made by the
project's own attacks, written as small PNGs with an index (`fisherguard examples`)."""

import json
from pathlib import Path

import numpy as np
from torch import Tensor

from service import attacks
from service.baselines import baseline_scores
from service.bundle import Bundle
from service.data import Dataset
from service.detector import decision_p_value
from service.fisher import SCORES, compute
from service.images import encode_png

STATIC = Path(__file__).parent / "static" / "examples"


def make_gallery(bundle: Bundle, data: Dataset, eps: float, n: int = 4, out: Path | None = None) -> list[dict[str, object]]:
    """n clean images from the evaluation half with PGD-L∞ versions (ε = eps, 8-bit). It keeps the
    first n pairs in the seeded order whose attack succeeded, flagged or not, and says which."""
    assert bundle.calibration is not None
    out = out or STATIC / bundle.name
    out.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(3).permutation(len(data.x))[: 8 * n]
    x, y = data.x[order], data.y[order]
    adv = attacks.quantise(attacks.pgd_linf(bundle.model, x, y, eps))
    needed = bundle.calibration.decision_scores
    rc, ra = (_decision_scores(bundle, images) for images in (x, adv))
    entries: list[dict[str, object]] = []
    for i in range(len(x)):
        if len(entries) == 2 * n:
            break
        if int(rc[0][i]) != int(y[i]) or int(ra[0][i]) == int(y[i]):
            continue
        for kind, img, (_, r) in (("clean", x[i], rc), ("pgd", adv[i], ra)):
            name = f"{len(entries) // 2:02d}-{kind}.png"
            (out / name).write_bytes(encode_png(img))
            p = decision_p_value(bundle, {k: float(r[k][i]) for k in needed})
            entries.append(
                {
                    "file": name,
                    "kind": kind,
                    "true_label": bundle.classes[int(y[i])],
                    "attack": f"PGD-L∞ ε={_eps_text(eps)}, 40 steps, 8-bit" if kind == "pgd" else None,
                    "flagged_when_made": p <= bundle.calibration.alpha,
                }
            )
    (out / "index.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def _decision_scores(bundle: Bundle, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Predictions and the raw values of the scores the bundle's decision needs."""
    assert bundle.calibration is not None
    needed = bundle.calibration.decision_scores
    r = compute(bundle.model, x, [s for s in needed if s in SCORES], **bundle.calibration.score_options)
    extra = baseline_scores(bundle.model, x, [s for s in needed if s not in SCORES], bundle.mahalanobis)
    return r.predicted, r.scores | extra


def _eps_text(eps: float) -> str:
    """8/255 for ε = 0.0314, else the number as given."""
    steps = round(eps * 255)
    return f"{steps}/255" if steps and abs(eps * 255 - steps) < 1e-3 else f"{eps:g}"


def gallery_urls(bundle_name: str) -> list[dict[str, object]]:
    index = STATIC / bundle_name / "index.json"
    if not index.is_file():
        return []
    return [e | {"url": f"/static/examples/{bundle_name}/{e['file']}"} for e in json.loads(index.read_text())]
