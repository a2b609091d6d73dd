"""`fisherguard evaluate`: measure detection against attacks (docs/detection.md#protocol)."""

import argparse
import sys
from pathlib import Path

from service.cli import common
from service.core.scores import DETECTORS
from service.core.splits import SPLITS


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    e = sub.add_parser("evaluate", help="measure detection against attacks")
    e.add_argument("--model", default="mnist")
    e.add_argument("--data", type=Path)
    e.add_argument("--split", default="evaluation", choices=SPLITS)
    e.add_argument(
        "--attacks",
        default="pgd_linf:0.1,pgd_linf:0.3",
        help="comma list of attacks and controls, e.g. fgsm:0.1,pgd_linf:8/255,cw:5,deepfool,noise:0.1,jpeg:50 (docs/detection.md#attacks)",
    )
    e.add_argument("--baselines", default="", help=f"comma list of {', '.join(DETECTORS)}")
    e.add_argument("--train-subset", type=int, default=10000, help="training images that fit the Mahalanobis baseline")
    e.add_argument("--limit", type=int, help="attack at most this many clean images (seeded subset)")
    e.add_argument("--out", type=Path, default=Path("bench/results/evaluate"))
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument(
        "--cache",
        type=Path,
        default=Path(".cache/attacks"),
        help="where attacked images are kept between runs (every attack but the adaptive one; docs/detection.md#attack-cache)",
    )
    e.add_argument("--no-cache", dest="cache", action="store_const", const=None, help="run every attack afresh and keep nothing")
    e.add_argument(
        "--prepare",
        action="store_true",
        help="only run the attacks into the cache, on the images a later run will attack; compute and show no score",
    )
    common.add_device(e)
    e.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from service.lab import report
    from service.lab.attack_specs import parse_attack
    from service.lab.data import load_dataset
    from service.lab.evaluate import evaluate, extra_detectors, prepare

    bundle = common.bundle(a)
    path = a.data or common.default_data(bundle.card)
    data = load_dataset(path, a.split, bundle.classes, bundle.input)
    if a.prepare:
        if a.cache is None:
            raise SystemExit("evaluate: --prepare keeps the attacked images in the cache; it cannot go with --no-cache")
        attacks = [parse_attack(s, bundle) for s in a.attacks.split(",")]
        found = prepare(bundle, data, attacks, a.limit, a.cache, a.batch_size, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"{sum(found.values())} of {len(found)} attacks were kept already; the rest are now, in {a.cache}")
        return 0
    extra = extra_detectors(bundle, [b for b in a.baselines.split(",") if b], path, a.train_subset, a.split)
    attacks = [parse_attack(s, bundle) for s in a.attacks.split(",")]
    result = evaluate(bundle, data, attacks, a.limit, batch_size=a.batch_size, progress=sys.stderr.isatty(), extra=extra, cache=a.cache)
    report.write(result, a.out)
    report.plot_roc(result, a.out)
    print(report.markdown(result))
    return 0
