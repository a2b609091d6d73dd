"""`fisherguard fit-detector`: train the learned detector on part A of the calibration half and measure
it on part B, each training family also left out (docs/detection.md#learned-detector)."""

import argparse
import sys
from pathlib import Path

from service.cli import common


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    f = sub.add_parser("fit-detector", help="train the learned detector on the calibration half's part A")
    f.add_argument("--model", default="mnist")
    f.add_argument("--data", type=Path, help="npz file (default ../shared/data/<card's file>)")
    f.add_argument("--attacks", required=True, help="comma list of training attack specs (positives)")
    f.add_argument("--controls", required=True, help="comma list of benign control specs (negatives beside the clean images)")
    f.add_argument("--limit", type=int, default=500, help="part-A images attacked per spec (seeded subset)")
    f.add_argument("--validate-limit", type=int, default=300, help="part-B images attacked per spec")
    f.add_argument("--sigma", type=float, required=True, help="noise scale of the neighbourhood response (pixel values in [0, 1])")
    f.add_argument("--draws", type=int, default=2, help="noise draws, in antithetic pairs (even)")
    f.add_argument("--squeezers", required=True, help="comma list of squeezers: bits1, bits4, bits5, median2, blur05, blur1")
    f.add_argument("--kind", choices=["linear", "mlp"], default="linear")
    f.add_argument("--hidden", type=int, default=32)
    f.add_argument("--l2", type=float, default=1e-3)
    f.add_argument("--control-weight", type=float, default=3.0, help="total weight of the controls relative to the clean images")
    f.add_argument("--control-margin", type=float, default=0.0, help="fit the controls as if their logit were this much larger")
    f.add_argument(
        "--control-negatives",
        choices=["all", "still-right"],
        default="all",
        help="which of a control's changed images are negatives: all, or only those the classifier still reads right",
    )
    f.add_argument("--nuisance", action="store_true", help="project out the directions the controls move the features in")
    f.add_argument(
        "--nuisance-families",
        default="",
        help="with --nuisance: comma list of control families, one direction each (their specs pooled); default one per control",
    )
    f.add_argument(
        "--without",
        default="",
        help="comma list of feature groups (predictive, fisher, squeezing, mahalanobis) or columns (e.g. residual) to leave out",
    )
    f.add_argument("--cache", type=Path, default=Path(".cache/attacks"), help="where attacked images are kept between runs")
    f.add_argument("--out", type=Path, help="default: <bundle>/detector.safetensors")
    f.add_argument("--report", type=Path, required=True, help="folder for detector.json and detector.md")
    common.add_device(f)
    f.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from service.core.features import FeatureSpec
    from service.lab import learn

    bundle = common.bundle(a)
    opts = learn.Options(
        FeatureSpec(a.sigma, a.draws, tuple(a.squeezers.split(","))),
        a.kind,
        a.hidden,
        a.l2,
        a.control_weight,
        a.control_margin,
        a.nuisance,
        nuisance_families=tuple(f for f in a.nuisance_families.split(",") if f),
        control_negatives=a.control_negatives,
        without=tuple(g for g in a.without.split(",") if g),
    )
    collected = learn.collect(
        bundle,
        a.data or common.default_data(bundle.card),
        a.attacks.split(","),
        a.controls.split(","),
        opts.spec,
        a.limit,
        a.validate_limit,
        a.cache,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    detector, report = learn.fit(collected, opts)
    out = a.out or bundle.path / "detector.safetensors"
    detector.save(out, bundle.weights_sha256)
    learn.write(report, a.report)
    print(learn.markdown(report))
    print(f"wrote {out}; calibrate with: fisherguard calibrate --model {bundle.path} --split calibration-b …")
    return 0
