"""`fisherguard examples`: the web page's gallery of clean and adversarial images."""

import argparse
from pathlib import Path

from service.cli import common


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    g = sub.add_parser("examples", help="write the web page's gallery of clean and adversarial images")
    g.add_argument("--model", default="mnist")
    g.add_argument("--data", type=Path)
    g.add_argument("--eps", type=float, default=0.3)
    g.add_argument("--n", type=int, default=4)
    g.set_defaults(func=run, device="cpu", threads=None)


def run(a: argparse.Namespace) -> int:
    from service.lab.data import load_dataset
    from service.lab.examples import make_gallery

    bundle = common.bundle(a)
    data = load_dataset(a.data or common.default_data(bundle.card), "evaluation", bundle.classes, bundle.input)
    entries = make_gallery(bundle, data, a.eps, a.n)
    print(f"wrote {len(entries)} gallery images for {bundle.name}")
    return 0
