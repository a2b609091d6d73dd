"""The project's attacks against IBM's Adversarial Robustness Toolbox (ART) at the same settings, on
the shipped bundles: success rate (after 8-bit quantisation) and median L2 / L∞ of the successful
images. A weak attack would inflate every detection rate downstream.

    python -m bench.art_compare --model cifar10 --limit 60 --skip cw --out bench/results/art-compare-cifar10
    python -m bench.art_compare --model mnist --limit 100 --out bench/results/art-compare-mnist

Images: a seeded subset of the correctly classified images of part B of the calibration half.
"""

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write
from service.cli.common import default_data
from service.core.bundle import load_bundle
from service.core.scoring import predict
from service.lab import art_attacks, attacks, learn
from service.lab.data import load_dataset, seeded_subset

PAIRS = {  # name -> (ours, ART's), the same settings
    "cifar10": {
        "pgd_linf 8/255, 40 steps": (
            lambda m, x, y: attacks.pgd_linf(m, x, y, 8 / 255),
            lambda m, x, y: art_attacks.pgd(m, x, y, 8 / 255, 40),
        ),
        "pgd_linf 2/255, 40 steps": (
            lambda m, x, y: attacks.pgd_linf(m, x, y, 2 / 255),
            lambda m, x, y: art_attacks.pgd(m, x, y, 2 / 255, 40),
        ),
        "cw κ=0, 100 steps × 6": (lambda m, x, y: attacks.cw_l2(m, x, y, 0.0), lambda m, x, y: art_attacks.cw(m, x, y, 0.0, 100, 6)),
        "deepfool, overshoot 0.02": (
            lambda m, x, y: attacks.deepfool(m, x, y, 50, 0.02),
            lambda m, x, y: art_attacks.deepfool(m, x, y, 0.02, 50),
        ),
        "square 8/255, 1000 queries": (
            lambda m, x, y: attacks.square_linf(m, x, y, 8 / 255, 1000),
            lambda m, x, y: art_attacks.square(m, x, y, 8 / 255, 1000),
        ),
    },
    "mnist": {
        "pgd_linf 0.3, 40 steps": (lambda m, x, y: attacks.pgd_linf(m, x, y, 0.3), lambda m, x, y: art_attacks.pgd(m, x, y, 0.3, 40)),
        "pgd_linf 0.1, 40 steps": (lambda m, x, y: attacks.pgd_linf(m, x, y, 0.1), lambda m, x, y: art_attacks.pgd(m, x, y, 0.1, 40)),
        "cw κ=0, 100 steps × 6": (lambda m, x, y: attacks.cw_l2(m, x, y, 0.0), lambda m, x, y: art_attacks.cw(m, x, y, 0.0, 100, 6)),
        "deepfool, overshoot 0.02": (
            lambda m, x, y: attacks.deepfool(m, x, y, 50, 0.02),
            lambda m, x, y: art_attacks.deepfool(m, x, y, 0.02, 50),
        ),
        "square 0.3, 1000 queries": (
            lambda m, x, y: attacks.square_linf(m, x, y, 0.3, 1000),
            lambda m, x, y: art_attacks.square(m, x, y, 0.3, 1000),
        ),
    },
}


def strength(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor) -> dict[str, Any]:
    adv = attacks.quantise(adv)
    hit = predict(model, adv) != y
    d = (adv - x)[hit].flatten(1)
    return {
        "success_rate": float(hit.float().mean()),
        "median_l2": float(d.norm(dim=1).median()) if len(d) else None,
        "median_linf": float(d.abs().amax(1).median()) if len(d) else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", default="cifar10", choices=sorted(PAIRS))
    ap.add_argument("--data", type=Path)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated attack kinds to leave out, e.g. cw (ART's C&W is slow on CIFAR-10)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model)
    data = load_dataset(a.data or default_data(bundle.card), "calibration-b", bundle.classes, bundle.input)
    data = seeded_subset(learn.correct(bundle, data), a.limit)
    rows: dict[str, Any] = {}
    skipped = [k for k in a.skip.split(",") if k]
    for name, (ours, theirs) in PAIRS[a.model].items():
        if name.split()[0] in skipped:
            continue
        row: dict[str, Any] = {}
        for who, fn in (("ours", ours), ("art", theirs)):
            t0 = time.time()
            adv = torch.cat([fn(bundle.model, data.x[i : i + 50], data.y[i : i + 50]) for i in range(0, len(data.y), 50)])
            row[who] = strength(bundle.model, data.x, data.y, adv) | {"seconds": round(time.time() - t0, 1)}
        rows[name] = row
        print(name, row, flush=True)
    lines = [
        f"# {a.model}: the project's attacks and ART's at the same settings ({len(data.y)} images)",
        "",
        "| attack | success (ours / ART) | median L2 (ours / ART) | median L∞ (ours / ART) |",
        "|---|---|---|---|",
    ]
    f = lambda v: f"{v:.3f}" if v is not None else "—"  # noqa: E731
    for name, r in rows.items():
        o, t = r["ours"], r["art"]
        lines.append(
            f"| {name} | {f(o['success_rate'])} / {f(t['success_rate'])} | {f(o['median_l2'])} / {f(t['median_l2'])} | {f(o['median_linf'])} / {f(t['median_linf'])} |"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    write(
        a.out / "art_compare.json",
        {"environment": environment("cpu"), "model": a.model, "images": len(data.y), "skipped": skipped, "rows": rows},
    )
    (a.out / "art_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
