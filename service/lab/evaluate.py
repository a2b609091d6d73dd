"""`fisherguard evaluate`: detection quality as docs/detection.md#protocol defines it.

Clean = images of the chosen half the model classifies correctly. Each attack runs on (a seeded subset
of) them; adversarial images are quantised to 8 bits and kept only if still misclassified. Per
attack and score: ROC-AUC (clean vs adversarial, bootstrap 95% interval), TPR at the calibrated
thresholds, the realised clean FPR, and the rate of attacks that succeed unflagged.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.core import decision
from service.core.baselines import Mahalanobis
from service.core.batches import cat_batches, device_of
from service.core.bundle import Bundle
from service.core.calibration import conformal_p_value
from service.core.scores import DETECTORS, SCORES
from service.core.scoring import predict, score_dataset
from service.lab import attack_cache, attacks
from service.lab.attack_specs import Attack
from service.lab.data import Dataset, load_dataset, load_train_subset, seeded_pick
from service.lab.stats import bootstrap_auc, roc_auc, roc_points

ALPHAS = (0.05, 0.01)  # the α a report measures TPR at: the detection goal's and the service's default
MISREAD = "misread"  # scores.npz key, under a control's name, of the images the classifier misreads after the change


@dataclass
class Extra:
    """Clean-data detectors the bundle's calibration lacks, fitted and calibrated by the harness:
    scored with `bundle` (the bundle with the harness's own fits), calibrated on `calibration` (the
    bundle's calibration half; none when the run itself is on that half)."""

    bundle: Bundle
    names: list[str]
    calibration: Dataset | None


def extra_detectors(bundle: Bundle, names: Sequence[str], data: Path, train_subset: int, split: str) -> Extra | None:
    """The requested detectors that the calibration lacks; Mahalanobis is fitted on `train_subset`
    seeded training images when the bundle has no fit with the layers asked for."""
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; known: {', '.join(DETECTORS)}")
    cal = bundle.calibration
    assert cal is not None
    missing = [n for n in names if n not in cal.values]
    if not missing:
        return None
    fit = bundle.mahalanobis
    if any(n.startswith("mahalanobis") for n in missing):
        fit = Mahalanobis.fit(bundle.model, *load_train_subset(data, train_subset))
    half = load_dataset(data, "calibration", bundle.classes, bundle.input) if split == "evaluation" else None
    return Extra(dataclasses.replace(bundle, mahalanobis=fit), missing, half)


def run_attack(attack: Attack, bundle: Bundle, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """The attack on (x, y) in batches on the model's device, 8-bit quantised, on the CPU."""
    model = bundle.model
    return attacks.quantise(cat_batches(lambda xb, yb: attack.run(model, xb, yb), x, y, batch=batch, device=device_of(model)))


def cached_attack(
    bundle: Bundle, attack: Attack, x: torch.Tensor, y: torch.Tensor, cache: Path | None, batch: int
) -> tuple[torch.Tensor, bool, str]:
    """The attack's images on (x, y): from the cache when they are kept there, else run (and kept when
    the attack is one the cache keeps); whether they were kept already; and the key they are kept under
    (service.lab.attack_cache)."""
    key = attack_cache.attack_key(bundle, attack, x, y)
    adv, was_kept = attack_cache.load_or_run(attack_cache.path_for(cache, attack, key), partial(run_attack, attack, bundle, x, y, batch))
    return adv, was_kept, key


def _rows(cal: dict[str, np.ndarray], clean: dict[str, np.ndarray], adv: dict[str, np.ndarray], alphas: Sequence[float]) -> dict[str, Any]:
    """Per score: AUC with a bootstrap interval, and TPR / realised FPR at conformal thresholds."""
    rows = {}
    for name in cal:
        c, a, direction = clean[name], adv[name], SCORES[name].direction
        pc, pa = conformal_p_value(cal[name], c, direction), conformal_p_value(cal[name], a, direction)
        sign = 1.0 if direction == "high" else -1.0
        lo, hi = bootstrap_auc(sign * c, sign * a)
        rows[name] = {
            "auc": roc_auc(sign * c, sign * a),
            "auc_ci95": [lo, hi],
            "roc": roc_points(sign * c, sign * a),
            **decision.rates(pa, alphas, "tpr"),
            **decision.rates(pc, alphas, "fpr"),
        }
    return rows


def _score(bundle: Bundle, extra: Extra | None, x: torch.Tensor, batch: int, progress: bool) -> dict[str, np.ndarray]:
    """The calibrated scores (and the harness's extra ones) of x."""
    cal = bundle.calibration
    assert cal is not None
    values = score_dataset(bundle, x, sorted(cal.values), batch, progress)[0]
    if extra is not None:
        values |= score_dataset(extra.bundle, x, extra.names, batch, progress)[0]
    return values


def read_right(bundle: Bundle, data: Dataset) -> np.ndarray:
    """Which of the images (N,) the model reads right: a run's clean images."""
    return (predict(bundle, data.x) == data.y).numpy()


def attack_inputs(data: Dataset, ok: np.ndarray, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images the attacks start from: a seeded subset of `limit` of those read right (ok (N,)); their
    labels; and their positions among those read right."""
    pick = torch.from_numpy(seeded_pick(int(ok.sum()), limit))
    return data.x[ok][pick], data.y[ok][pick], pick


def prepare(
    bundle: Bundle,
    data: Dataset,
    attack_list: Sequence[Attack],
    limit: int | None,
    cache: Path,
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> dict[str, bool]:
    """Runs the attacks into the cache on exactly the images `evaluate` will attack, and reads no score:
    the evaluation half's slow part done before a decision is fixed, without a detection number seen
    (docs/detection.md#attack-cache). The adaptive attack is left out (it attacks the decision). ->
    per attack kept in the cache, whether its images were there already."""
    x, y, _ = attack_inputs(data, read_right(bundle, data), limit)
    found = {}
    for attack in attack_list:
        if not attack_cache.kept(attack):
            log(f"{attack.name}: attacks the decision, never kept; left out")
            continue
        t0 = time.time()
        _, found[attack.name], _ = cached_attack(bundle, attack, x, y, cache, batch_size)
        log(f"{attack.name}: {'already kept' if found[attack.name] else 'kept'} ({time.time() - t0:.0f} s)")
    return found


def evaluate(
    bundle: Bundle,
    data: Dataset,
    attack_list: Sequence[Attack],
    limit: int | None,
    alphas: Sequence[float] = ALPHAS,
    batch_size: int = 64,
    progress: bool = False,
    extra: Extra | None = None,
    cache: Path | None = None,
) -> dict[str, Any]:
    """The report: clean FPR per score, and per attack its success, distortion and detection rows. With a
    cache, an attack's images are kept there and taken from there (service.lab.attack_cache)."""
    cal = bundle.calibration
    if cal is None:
        raise ValueError(f"bundle {bundle.name} has no calibration.json; run `fisherguard calibrate` first")
    ok = read_right(bundle, data)
    clean = _score(bundle, extra, data.x[ok], batch_size, progress)  # the images read right: a run's clean images
    x, y, pick = attack_inputs(data, ok, limit)
    cal_values = dict(cal.values)
    if extra is not None and extra.calibration is not None:  # the extra detectors' own clean calibration
        cx, cy = extra.calibration.x, extra.calibration.y
        keep = predict(bundle, cx) == cy
        cal_values |= {k: np.sort(v) for k, v in score_dataset(extra.bundle, cx[keep], extra.names, batch_size)[0].items()}
    p_clean = cal.decision_p_value(clean, data.y.numpy()[ok])
    p_unchanged = p_clean[pick.numpy()]  # the attacked images themselves, before any change
    per_image: dict[str, np.ndarray] = {f"clean/{k}": v for k, v in clean.items()} | {f"calibration/{k}": v for k, v in cal_values.items()}
    report: dict[str, Any] = {
        "per_image": per_image,  # thresholded-form values per image, for offline analysis (write() puts them in scores.npz)
        "bundle": {"name": bundle.name, "version": bundle.card["version"], "weights_sha256": bundle.weights_sha256},
        "data": data.description,
        "calibration": cal.summary() | {"scores": None},
        "baselines": sorted(extra.names) if extra else [],
        "clean": {
            "n": int(ok.sum()),
            "decision_fpr": {str(a): decision.flag_rate(p_clean, a) for a in alphas},
            "fpr": {
                k: {str(a): decision.flag_rate(conformal_p_value(v, clean[k], SCORES[k].direction), a) for a in alphas}
                for k, v in cal_values.items()
            },
        },
        "attacked_images": len(x),
        "attacked_unchanged": decision.rates(p_unchanged, alphas, "flagged"),  # what each control's rate is measured against
        "attacks": {},
    }
    for attack in attack_list:
        t0 = time.time()
        adv, was_kept, _ = cached_attack(bundle, attack, x, y, cache, batch_size)
        adv_pred = predict(bundle, adv)
        hit = torch.ones_like(y, dtype=torch.bool) if attack.control else adv_pred != y  # controls keep every image
        delta = (adv - x)[hit].flatten(1)
        adv_scores = _score(bundle, extra, adv[hit], batch_size, progress)
        per_image |= {f"{attack.name}/{k}": v for k, v in adv_scores.items()}
        p_adv = cal.decision_p_value(adv_scores, adv_pred[hit].numpy())
        misread = (adv_pred != y).numpy()
        if attack.control:  # which changed images the classifier now misreads: flagging those is no false alarm
            per_image[f"{attack.name}/{MISREAD}"] = misread
        stat = decision.rates(p_adv, alphas, "tpr") | decision.rates(p_clean, alphas, "fpr")
        stat["auc"] = roc_auc(-cal.decision_rank(clean), -cal.decision_rank(adv_scores)) if len(p_adv) else float("nan")
        success = float(misread.mean())
        report["attacks"][attack.name] = {
            "control": attack.control,
            "family": attack.family,
            "seen": seen(bundle, attack),
            "success_rate": success,
            "n_successful": int(hit.sum()),
            "median_l2": float(delta.norm(dim=1).median()) if len(delta) else None,
            "median_linf": float(delta.abs().amax(1).median()) if len(delta) else None,
            "decision": stat,
            "unflagged_success_rate": {str(a): success * (1 - stat[f"tpr@{a}"]) for a in alphas},
            "flag_rate_by_predicted_class": _flags_by_class(p_adv, adv_pred[hit].numpy(), alphas[0]),
            "still_right": _still_right(p_adv, misread, alphas) if attack.control else None,
            "added": _added(p_adv, p_unchanged, alphas) if attack.control else None,
            "scores": _rows(cal_values, clean, adv_scores, alphas),
            "seconds": round(time.time() - t0, 1),
            "cached": was_kept,  # the images came from the cache: `seconds` is then the scoring alone
        }
    return report


def seen(bundle: Bundle, attack: Attack) -> bool | None:
    """Whether the bundle's learned detector was trained on the attack's family (None: it has no detector)."""
    if bundle.detector is None:
        return None
    meta = bundle.detector.meta
    return attack.family in meta.get("control_families" if attack.control else "families", [])


def _still_right(p: np.ndarray, misread: np.ndarray, alphas: Sequence[float]) -> dict[str, Any]:
    """A control's false alarms: its flag rate among the changed images the classifier still reads right."""
    return {"n": int((~misread).sum())} | decision.rates(p[~misread], alphas, "flagged")


def _added(p: np.ndarray, p_unchanged: np.ndarray, alphas: Sequence[float]) -> dict[str, float]:
    """A control's own flags: the share of its images flagged after the change and not before it (the
    same images unchanged), per α."""
    return {f"flagged@{a}": float((decision.flag(p, a) & ~decision.flag(p_unchanged, a)).mean()) for a in alphas}


def _flags_by_class(p: np.ndarray, predicted: np.ndarray, alpha: float) -> dict[str, float]:
    return {str(c): decision.flag_rate(p[predicted == c], alpha) for c in np.unique(predicted)}
