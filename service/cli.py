"""The `fisherguard` command: serve, calibrate, evaluate, examples, train, inspect."""

import argparse
import sys
from pathlib import Path

from service.baselines import BASELINES
from service.evaluate import ATTACK_HELP
from service.fisher import SCORES

DEFAULT_DATA = Path("../shared/data")


def _default_data(bundle_card: dict) -> Path:  # type: ignore[type-arg]
    return DEFAULT_DATA / str(bundle_card.get("training_data", {}).get("file", ""))


def cmd_serve(a: argparse.Namespace) -> int:
    from service.server import run
    from service.settings import Settings

    fields = set(Settings.model_fields)
    overrides = {k: v for k, v in vars(a).items() if k in fields and v is not None}
    run(Settings(**overrides))
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:

    from service.calibrate import calibrate, clean_scores, redecide
    from service.calibration import COMBINED, Component
    from service.data import load_dataset

    bundle = _bundle(a)
    if a.scores and (a.fit_mahalanobis or bundle.calibration is None):
        raise ValueError("--scores changes the decision of an existing calibration: it needs one, and cannot go with --fit-mahalanobis")
    if a.fit_mahalanobis:
        from service.baselines import Mahalanobis
        from service.data import load_train_subset

        taps = a.mahalanobis_layers.split(",") if a.mahalanobis_layers else None
        train = load_train_subset(a.train_data or a.data or _default_data(bundle.card), a.fit_mahalanobis)
        fit = Mahalanobis.fit(bundle.model, *train, taps=taps)
        fit.save(bundle.path / "mahalanobis.safetensors", bundle.weights_sha256)
        bundle.mahalanobis = fit
    statistic = a.statistic or (
        bundle.calibration.statistic if bundle.calibration else bundle.card.get("decision_statistic", "sensitivity")
    )
    tail = a.tail or (bundle.calibration.tail if bundle.calibration else "one-sided")
    components = [Component(*c.split(":", 1)) for c in a.components.split(",")] if a.components else []
    if statistic == COMBINED and not components and bundle.calibration and bundle.calibration.combination:
        components = list(bundle.calibration.combination.components)
    if a.scores:
        assert bundle.calibration is not None
        cal = redecide(bundle.calibration, clean_scores(a.scores), a.alpha, statistic, tail, components)
    else:
        c, h, w = bundle.input_shape
        data = load_dataset(a.data or _default_data(bundle.card), a.split, bundle.classes, (c, h, w))
        cal = calibrate(bundle, data, a.alpha, statistic, tail, a.batch_size, progress=sys.stderr.isatty(), components=components)
    out = a.out or bundle.path / "calibration.json"
    cal.save(out)
    print(
        f"wrote {out}: n = {cal.n} clean, correctly classified images of {cal.data['description']}; statistic {statistic} ({tail}), alpha {a.alpha}"
    )
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:

    from service.baselines import Mahalanobis, feature_squeezing
    from service.data import load_dataset, load_train_subset
    from service.evaluate import Baseline, evaluate, markdown, parse_attack, plot_roc, write

    bundle = _bundle(a)
    path = a.data or _default_data(bundle.card)
    data = load_dataset(path, a.split, bundle.classes, bundle.input_shape)
    baselines: dict[str, Baseline] = {}
    names = [b for b in a.baselines.split(",") if b]
    if "feature_squeezing" in names:
        baselines["feature_squeezing"] = feature_squeezing
    if {"mahalanobis", "mahalanobis_layers"} & set(names):
        maha = Mahalanobis.fit(bundle.model, *load_train_subset(path, a.train_subset))
        baselines |= {"mahalanobis": maha.score, "mahalanobis_layers": maha.layers_score}
        baselines = {k: v for k, v in baselines.items() if k in names}
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; known: {', '.join(BASELINES)}")
    cal_half = load_dataset(path, "calibration", bundle.classes, bundle.input_shape) if baselines and a.split == "evaluation" else None
    attack_list = [parse_attack(s, bundle) for s in a.attacks.split(",")]
    report = evaluate(
        bundle,
        data,
        attack_list,
        a.limit,
        batch_size=a.batch_size,
        progress=sys.stderr.isatty(),
        baselines=baselines,
        baseline_calibration=cal_half,
    )
    write(report, a.out)
    plot_roc(report, a.out)
    print(markdown(report))
    return 0


def cmd_examples(a: argparse.Namespace) -> int:
    from service.bundle import load_bundle
    from service.data import load_dataset
    from service.examples import make_gallery

    bundle = load_bundle(a.model, "cpu")
    data = load_dataset(a.data or _default_data(bundle.card), "evaluation", bundle.classes, bundle.input_shape)
    entries = make_gallery(bundle, data, a.eps, a.n)
    print(f"wrote {len(entries)} gallery images for {bundle.name}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    import importlib

    from service.bundle import SHIPPED

    if a.fisher_penalty < 0:
        raise ValueError(f"--fisher-penalty must be >= 0, got {a.fisher_penalty}")
    recipe = importlib.import_module(f"models.{a.bundle}.train")
    out = a.out or SHIPPED / (f"{a.bundle}-fisherreg" if a.fisher_penalty > 0 else a.bundle)
    data = a.data or DEFAULT_DATA / ("mnist.npz" if a.bundle == "mnist" else "cifar10_jpeg.npz")
    options = {"epochs": a.epochs} if a.epochs else {}
    card = recipe.train(data, out, seed=a.seed, fisher_penalty=a.fisher_penalty, **options)
    print(f"wrote {out}: test accuracy {card['test_accuracy']}; calibrate it with: fisherguard calibrate --model {out}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from service.bundle import load_bundle
    from service.data import Dataset, load_dataset
    from service.inspection import inspect, markdown, write

    if a.threads:
        torch.set_num_threads(a.threads)
    reports = []
    for name in a.model or ["mnist"]:
        bundle = load_bundle(name, _device(a.device))
        data = load_dataset(a.data or _default_data(bundle.card), a.split, bundle.classes, bundle.input_shape)
        if a.limit is not None and a.limit < len(data.y):
            pick = torch.from_numpy(np.sort(np.random.default_rng(1).choice(len(data.y), a.limit, replace=False)))
            data = Dataset(data.x[pick], data.y[pick], f"{data.description}, seeded subset of {a.limit}", data.sha256)
        reports.append(inspect(bundle, data, a.batch_size, progress=sys.stderr.isatty()))
    write(reports, a.out)
    print(markdown(reports))
    return 0


def _bundle(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The bundle named by --model, on --device, with --threads applied."""
    import torch

    from service.bundle import load_bundle

    if a.threads:
        torch.set_num_threads(a.threads)
    return load_bundle(a.model, _device(a.device))


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fisherguard", description="Fisher-information detection of adversarial images.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service")
    s.add_argument("--model", help="bundle name (mnist, cifar10) or directory; default mnist")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"])
    s.add_argument("--max-batch-size", type=int)
    s.add_argument("--max-delay-ms", type=float)
    s.add_argument("--max-queue-images", type=int)
    s.add_argument("--request-timeout-ms", type=float)
    s.add_argument("--torch-threads", type=int)
    s.add_argument("--log-level")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("calibrate", help="write calibration.json from clean data")
    c.add_argument("--model", default="mnist")
    c.add_argument("--data", type=Path, help="npz file or class-folder directory (default ../shared/data/<card's file>)")
    c.add_argument("--split", default="calibration", choices=["calibration", "evaluation", "all"])
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
        "score uses (default: the end of every stage but the first, service.baselines.stage_outputs)",
    )
    c.add_argument("--train-data", type=Path, help="npz with the training split for --fit-mahalanobis (default: --data)")
    c.add_argument(
        "--statistic",
        choices=[*sorted(SCORES), *BASELINES, "combined"],
        help="decision statistic (default: the bundle's current one)",
    )
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
    c.add_argument("--out", type=Path, help="default: <bundle>/calibration.json")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c.add_argument("--threads", type=int)
    c.set_defaults(func=cmd_calibrate)

    e = sub.add_parser("evaluate", help="measure detection against attacks (design.md §7)")
    e.add_argument("--model", default="mnist")
    e.add_argument("--data", type=Path)
    e.add_argument("--split", default="evaluation", choices=["calibration", "evaluation", "all"])
    e.add_argument(
        "--attacks",
        default="pgd_linf:0.1,pgd_linf:0.3",
        help=f"comma list: {ATTACK_HELP}",
    )
    e.add_argument("--baselines", default="", help=f"comma list of {', '.join(BASELINES)}")
    e.add_argument("--train-subset", type=int, default=10000, help="training images that fit the Mahalanobis baseline")
    e.add_argument("--limit", type=int, help="attack at most this many clean images (seeded subset)")
    e.add_argument("--out", type=Path, default=Path("bench/results/evaluate"))
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--threads", type=int)
    e.set_defaults(func=cmd_evaluate)

    g = sub.add_parser("examples", help="write the web page's gallery of clean and adversarial images")
    g.add_argument("--model", default="mnist")
    g.add_argument("--data", type=Path)
    g.add_argument("--eps", type=float, default=0.3)
    g.add_argument("--n", type=int, default=4)
    g.set_defaults(func=cmd_examples)

    t = sub.add_parser("train", help="train a bundle with the shipped recipe, optionally with the β·tr G_x Fisher penalty")
    t.add_argument("--bundle", required=True, choices=["mnist", "cifar10"], help="which shipped recipe")
    t.add_argument("--fisher-penalty", type=float, default=0.0, help="β >= 0 (default 0: the shipped bundle's recipe)")
    t.add_argument("--data", type=Path, help="default ../shared/data/mnist.npz or cifar10_jpeg.npz")
    t.add_argument("--out", type=Path, help="default models/<bundle>-fisherreg (β > 0) or models/<bundle>")
    t.add_argument("--epochs", type=int, help="default: the recipe's (mnist 8, cifar10 40)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    n = sub.add_parser("inspect", help="report a model's Fisher geometry on clean data (Markdown, JSON, plots)")
    n.add_argument("--model", action="append", help="bundle name or directory; repeat to compare models (default mnist)")
    n.add_argument("--data", type=Path, help="npz file or class-folder directory (default ../shared/data/<card's file>)")
    n.add_argument("--split", default="all", choices=["calibration", "evaluation", "all"])
    n.add_argument("--limit", type=int, help="at most this many images (seeded subset)")
    n.add_argument("--out", type=Path, default=Path("bench/results/inspect"))
    n.add_argument("--batch-size", type=int, default=64)
    n.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    n.add_argument("--threads", type=int)
    n.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return int(a.func(a))
    except (ValueError, FileNotFoundError) as e:
        print(f"fisherguard {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
