"""`fisherguard calibrate`: clean, correctly classified images -> calibration.json (docs/detection.md#calibration)."""

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core.baselines import Mahalanobis
from service.core.bundle import Bundle
from service.core.calibration import COMBINED, Calibration, Combination, Component, mondrian_references
from service.core.scoring import predict, score_dataset
from service.lab import folders
from service.lab.data import Dataset, load_dataset, load_train_subset

DEFAULT_OPTIONS: dict[str, Any] = {"noise_sigma": 0.1, "noise_samples": 16}


def _check_decision(statistic: str, components: Sequence[Component], available: set[str]) -> None:
    """A decision statistic and components that the available scores can serve."""
    if statistic not in available and statistic != COMBINED:
        raise ValueError(f"unknown decision statistic {statistic!r}; known: {sorted(available)} or {COMBINED!r}")
    missing = [c.score for c in components if c.score not in available]
    if missing:
        raise ValueError(f"this bundle cannot compute {missing}; it has {sorted(available)}")
    if (statistic == COMBINED) != bool(components):
        raise ValueError("components go with the statistic 'combined', and it needs at least one")


def calibrate(
    bundle: Bundle,
    data: Dataset,
    alpha: float,
    statistic: str,
    tail: str = "one-sided",
    batch_size: int = 64,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    components: Sequence[Component] = (),
    mondrian: bool = False,
    names: Sequence[str] | None = None,
) -> Calibration:
    """Scores every clean image the model classifies correctly; keeps the sorted values per score
    (`names`, default every score of the bundle). statistic "combined" fits a Combination of
    `components` on two seeded halves of those images; mondrian adds the decision's references per class."""
    _check_decision(statistic, components, set(bundle.scores))
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    values, pred = score_dataset(bundle, data.x, scored_names(bundle, names, statistic, components), batch_size, progress, opts)
    labels = data.y.numpy()
    correct = pred == labels
    meta = {"description": data.description + ", correctly classified images only", "sha256": data.sha256, "images": len(labels)}
    return from_values(bundle, values, labels, correct, meta, alpha, statistic, tail, opts, components, mondrian)


def scored_names(bundle: Bundle, names: Sequence[str] | None, statistic: str, components: Sequence[Component]) -> list[str]:
    """The scores a calibration keeps: `names` (at least the decision's) or every score of the bundle."""
    if names is None:
        return list(bundle.scores)
    unknown = [n for n in names if n not in bundle.scores]
    if unknown:
        raise ValueError(f"this bundle cannot compute {unknown}; it has {sorted(bundle.scores)}")
    decision = [c.score for c in components] if statistic == COMBINED else [statistic]
    return list(dict.fromkeys([*names, *decision]))


def from_values(
    bundle: Bundle,
    values: Mapping[str, np.ndarray],
    labels: np.ndarray,
    keep: np.ndarray,
    meta: dict[str, Any],
    alpha: float,
    statistic: str,
    tail: str,
    opts: Mapping[str, Any],
    components: Sequence[Component] = (),
    mondrian: bool = False,
) -> Calibration:
    """A calibration from per-image thresholded values (n,), the images' labels (n,) and which of them
    to keep (n,) bool: the correctly classified ones."""
    kept = {k: np.asarray(v)[keep] for k, v in values.items()}
    combination = Combination.fit(components, kept) if components else None
    cal = Calibration(
        weights_sha256=bundle.weights_sha256,
        data=meta | {"correct": int(keep.sum())},
        alpha=alpha,
        statistic=statistic,
        values={k: np.sort(v) for k, v in kept.items()},
        score_options=dict(opts),
        tail=tail,
        combination=combination,
    )
    if mondrian:
        cal.mondrian = mondrian_references(cal, kept, labels[keep])
    return cal


def calibrate_folder(
    bundle: Bundle,
    root: Path,
    split: str,
    alpha: float,
    spec: "DecisionSpec",
    batch_size: int = 64,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    mondrian: bool = False,
    names: Sequence[str] | None = None,
    checkpoint: Path | None = None,
) -> Calibration:
    """A calibration from a folder of your clean images (service.lab.folders), streamed in batches and
    resumable from `checkpoint` (default <bundle>/calibration.partial.npz, removed when done). A class
    folder tree keeps the correctly classified images; a flat folder keeps every image, its
    predicted class standing in for the label (said in the calibration's data description)."""
    _check_decision(spec.statistic, spec.components, set(bundle.scores))
    opts = {**DEFAULT_OPTIONS, **(options or {})}
    everything = folders.scan(root, bundle.classes)
    part = everything.split(split)
    checkpoint = checkpoint or bundle.path / "calibration.partial.npz"
    scored = folders.score_folder(
        bundle, part, scored_names(bundle, names, spec.statistic, spec.components), opts, batch_size, checkpoint, progress
    )
    labels = np.asarray(part.labels)[scored.positions] if part.labels is not None else scored.predicted
    skipped = len(part.files) - len(scored.positions)
    what = (
        "correctly classified images only" if part.labels is not None else "unlabelled: every image, its predicted class taken as its label"
    )
    meta = {
        "description": f"{root.name}: "
        + (
            f"all {len(everything.files)}"
            if split == "all"
            else f"{split} of numpy.random.default_rng(0).permutation({len(everything.files)}) of its"
        )
        + f" {'class-folder' if everything.labelled else 'flat'} image files, {what}"
        + (f"; {skipped} files did not decode" if skipped else ""),
        "sha256": part.digest(),
        "images": len(scored.positions),
        "split": split,
        "seed": 0,
        "labelled": part.labels is not None,
    }
    cal = from_values(
        bundle, scored.values, labels, scored.predicted == labels, meta, alpha, spec.statistic, spec.tail, opts, spec.components, mondrian
    )
    checkpoint.unlink(missing_ok=True)
    return cal


def same_values(a: np.ndarray, b: np.ndarray, tol: float = 1e-2) -> bool:
    """Sorted values a, b (n,) equal up to float32 noise: max |a − b| ≤ tol · IQR(b). Scoring in other
    batch sizes moves Fisher scores of the most confident images by up to ~0.4% of the IQR (CIFAR-10
    net; the median image by ~1e-6); another image set or other weights moves the quantiles far more."""
    if a.shape != b.shape:
        return False
    iqr = float(np.subtract(*np.percentile(b, [75, 25]))) if len(b) else 0.0
    return bool(np.all(np.abs(a - b) <= tol * iqr + 1e-12 * np.abs(b)))


def redecide(
    cal: Calibration,
    clean: Mapping[str, np.ndarray],
    alpha: float,
    statistic: str,
    tail: str,
    components: Sequence[Component] = (),
    labels: np.ndarray | None = None,
) -> Calibration:
    """A new decision on the same clean images, without scoring them again: clean holds their values
    aligned per image (score -> (n,)), e.g. the clean part of `fisherguard evaluate --split calibration`
    on the same bundle; every score must sort to cal's values up to float32 reproducibility (the same
    images and weights scored in other batches: within 1% of the values' interquartile range).
    labels (n,), the images' classes in the same order, make the decision class-conditional (Mondrian)."""
    for name, values in cal.values.items():
        if name not in clean or not same_values(np.sort(clean[name]), np.asarray(values)):
            raise ValueError(
                f"the per-image scores do not match this calibration's values of {name!r}: score the same split with the same weights"
            )
    _check_decision(statistic, components, set(cal.values))
    combination = Combination.fit(components, {k: np.asarray(v, dtype=np.float64) for k, v in clean.items()}) if components else None
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    new = dataclasses.replace(cal, alpha=alpha, statistic=statistic, tail=tail, combination=combination, created=now, mondrian=None)
    if labels is not None:
        new.mondrian = mondrian_references(new, clean, labels)
    return new


def clean_scores(path: Path) -> dict[str, np.ndarray]:
    """The clean images' per-image values from an evaluate run's scores.npz."""
    with np.load(path) as z:
        return {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("clean/")}


@dataclass(frozen=True)
class DecisionSpec:
    """A decision to calibrate: a statistic (a score or `combined`), its tail, and a combination's components."""

    statistic: str
    tail: str
    components: tuple[Component, ...] = ()


def decision_spec(bundle: Bundle, statistic: str | None, tail: str | None, components: str | None) -> DecisionSpec:
    """What the command line asks for, the rest as the bundle has it now (its calibration, else its
    card's `decision_statistic`, else `sensitivity` one-sided). components: `SCORE:TAIL,...`."""
    cal = bundle.calibration
    stat = statistic or (cal.statistic if cal else bundle.card.get("decision_statistic", "sensitivity"))
    parts = tuple(Component(*c.split(":", 1)) for c in components.split(",")) if components else ()
    if stat == COMBINED and not parts and cal is not None and cal.combination is not None:
        parts = cal.combination.components
    return DecisionSpec(stat, tail or (cal.tail if cal else "one-sided"), parts)


def fit_mahalanobis(bundle: Bundle, data: Path, n: int, layers: str | None = None) -> Mahalanobis:
    """Fits the Mahalanobis baselines on n seeded training images, writes <bundle>/mahalanobis.safetensors
    (tied to the weights) and attaches the fit to the bundle. layers: comma list of module names."""
    taps = layers.split(",") if layers else None
    fit = Mahalanobis.fit(bundle.model, *load_train_subset(data, n), taps=taps)
    fit.save(bundle.path / "mahalanobis.safetensors", bundle.weights_sha256)
    bundle.mahalanobis = fit
    return fit


def run(
    bundle: Bundle,
    data: Path,
    split: str,
    alpha: float,
    spec: DecisionSpec,
    batch_size: int = 64,
    progress: bool = False,
    scores: Path | None = None,
    mondrian: bool = False,
    options: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
) -> Calibration:
    """A calibration for `spec`: from the clean images of `data`'s `split`, or, with `scores` (an
    evaluate run's scores.npz on the same split), a new decision on the existing one without rescoring.
    mondrian: class-conditional references (docs/detection.md#class-conditional-calibration)."""
    if scores is not None:
        if bundle.calibration is None:
            raise ValueError("--scores changes the decision of an existing calibration: this bundle has none")
        labels = None
        if mondrian:  # the run's clean images are the split's correctly classified ones, in order
            images = load_dataset(data, split, bundle.classes, bundle.input)
            labels = images.y.numpy()[predict(bundle, images.x).numpy() == images.y.numpy()]
        return redecide(bundle.calibration, clean_scores(scores), alpha, spec.statistic, spec.tail, spec.components, labels)
    if data.is_dir():
        return calibrate_folder(bundle, data, split, alpha, spec, batch_size, progress, options, mondrian, names)
    images = load_dataset(data, split, bundle.classes, bundle.input)
    trained = bundle.detector.meta.get("data", {}) if bundle.detector is not None else {}
    if trained.get("sha256") == images.sha256 and split in ("calibration", "calibration-a", "all"):
        raise ValueError(
            f"this bundle's learned detector was trained on {trained.get('split')} of this data: calibrate on images it "
            "never saw (--split calibration-b), or the conformal guarantee does not hold"
        )
    return calibrate(bundle, images, alpha, spec.statistic, spec.tail, batch_size, progress, options, spec.components, mondrian, names)
