"""`fisherguard inspect`: a model's Fisher geometry on clean data (docs/training.md#inspection)."""

import argparse
import sys
from pathlib import Path

from service.cli import common
from service.core.splits import SPLITS


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    n = sub.add_parser("inspect", help="report a model's Fisher geometry on clean data (Markdown, JSON, plots)")
    n.add_argument("--model", action="append", help="bundle name or directory; repeat to compare models (default mnist)")
    n.add_argument("--data", type=Path, help="npz file or class-folder directory (default ../shared/data/<card's file>)")
    n.add_argument("--split", default="all", choices=SPLITS)
    n.add_argument("--limit", type=int, help="at most this many images (seeded subset)")
    n.add_argument("--out", type=Path, default=Path("bench/results/inspect"))
    n.add_argument("--batch-size", type=int, default=64)
    common.add_device(n)
    n.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from service.lab import inspection
    from service.lab.data import load_dataset, seeded_subset

    reports = []
    for name in a.model or ["mnist"]:
        bundle = common.bundle(a, name)
        data = load_dataset(a.data or common.default_data(bundle.card), a.split, bundle.classes, bundle.input)
        reports.append(inspection.inspect(bundle, seeded_subset(data, a.limit), a.batch_size, progress=sys.stderr.isatty()))
    inspection.write(reports, a.out)
    print(inspection.markdown(reports))
    return 0
