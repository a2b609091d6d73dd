"""`fisherguard calibrate`: write calibration.json from clean data (docs/detection.md#calibration)."""

import argparse
import sys
from pathlib import Path

from service.cli import common
from service.core.scores import SCORES
from service.core.splits import SPLITS


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    c = sub.add_parser("calibrate", help="write calibration.json from clean data")
    c.add_argument("--model", default="mnist")
    c.add_argument(
        "--data",
        type=Path,
        help="npz file, class-folder directory or flat folder of unlabelled images (default ../shared/data/<card's file>); "
        "folders are scored in batches with a checkpoint, and a stopped run resumes",
    )
    c.add_argument("--split", default="calibration", choices=SPLITS)
    c.add_argument("--alpha", type=float, default=0.01)
    c.add_argument(
        "--fit-mahalanobis",
        type=int,
        metavar="N",
        help="fit the Mahalanobis baseline on N seeded training images and write <bundle>/mahalanobis.safetensors first",
    )
    c.add_argument(
        "--mahalanobis-layers",
        metavar="NAMES",
        help="with --fit-mahalanobis: comma list of module names (model.named_modules()) whose outputs the multi-layer "
        "score uses (default: the end of every stage but the first, service.core.baselines.stage_outputs)",
    )
    c.add_argument("--train-data", type=Path, help="npz with the training split for --fit-mahalanobis (default: --data)")
    c.add_argument("--statistic", choices=[*sorted(SCORES), "combined"], help="decision statistic (default: the bundle's current one)")
    c.add_argument(
        "--components",
        help="with --statistic combined: SCORE:TAIL,… (TAIL one-sided|two-sided); the decision is the smallest of their "
        "p-values, calibrated on half of the clean images",
    )
    c.add_argument("--tail", choices=["one-sided", "two-sided"], help="decision p-value: the score's own direction, or both tails")
    c.add_argument(
        "--scores",
        type=Path,
        help="change only the decision: take the clean images' per-image scores from a `fisherguard evaluate --split "
        "calibration` run's scores.npz on this bundle (checked against the calibration's values) instead of scoring again",
    )
    c.add_argument(
        "--mondrian",
        action="store_true",
        help="class-conditional: rank each image among the clean images of its predicted class, so the false-positive "
        "guarantee holds within every class (needs enough clean images per class for the α in use)",
    )
    c.add_argument("--only", metavar="SCORES", help="comma list: calibrate only these scores (and the decision's), not every one")
    c.add_argument(
        "--top-classes",
        type=int,
        metavar="M",
        help="sum the Fisher scores over the M most probable classes only (the neglected mass is reported); for large K",
    )
    c.add_argument("--out", type=Path, help="default: <bundle>/calibration.json")
    c.add_argument("--batch-size", type=int, default=64)
    common.add_device(c)
    c.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from service.lab import calibrate

    bundle = common.bundle(a)
    if a.scores and a.fit_mahalanobis:
        raise ValueError("--scores changes the decision of an existing calibration: it cannot go with --fit-mahalanobis")
    data = a.data or common.default_data(bundle.card)
    if a.fit_mahalanobis:
        calibrate.fit_mahalanobis(bundle, a.train_data or data, a.fit_mahalanobis, a.mahalanobis_layers)
    spec = calibrate.decision_spec(bundle, a.statistic, a.tail, a.components)
    options = {"top_classes": a.top_classes} if a.top_classes else None
    names = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else None
    cal = calibrate.run(bundle, data, a.split, a.alpha, spec, a.batch_size, sys.stderr.isatty(), a.scores, a.mondrian, options, names)
    out = a.out or bundle.path / "calibration.json"
    cal.save(out)
    print(
        f"wrote {out}: n = {cal.n} clean, correctly classified images of {cal.data['description']}; "
        f"statistic {spec.statistic} ({spec.tail}), alpha {a.alpha}"
        + (
            f"; class-conditional, {min(len(v) for v in cal.mondrian.values())} to {max(len(v) for v in cal.mondrian.values())} per class"
            if cal.mondrian
            else ""
        )
    )
    return 0
