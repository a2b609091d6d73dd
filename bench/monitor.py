"""How the query-pattern monitor's similarity was chosen (docs/security.md#query-patterns): on part A
of the calibration halves of MNIST and CIFAR-10 (never the evaluation half), a stream of distinct
clean images from one client, each compared with the window before it —

- the shipped measure: 16×16 grey thumbnails (service.serve.monitor), the nearest RMS distance to
  the 256 before, its quantiles and the share within the threshold NEAR;
- the first version's: 64-bit average hashes within 6 bits of one of the 512 before.

    python -m bench.monitor                     # -> bench/results/monitor.json

A decision-based attack's queries are measured against the same monitor in bench/disclosure.py.
"""

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import environment, write
from service.cli.common import default_data
from service.core.bundle import load_bundle
from service.lab.data import load_dataset
from service.serve.monitor import NEAR, PER_CLIENT, rms_distance, thumbnail


def average_hash(x: np.ndarray) -> np.ndarray:
    """The first version: 8×8 grey block means above their mean, 64 bits."""
    grey = x.mean(0)
    rows, cols = (np.linspace(0, n, 9).astype(int)[:-1] for n in grey.shape)
    sums = np.add.reduceat(np.add.reduceat(grey, rows, axis=0), cols, axis=1)
    cells = (sums / np.outer(np.diff([*rows, grey.shape[0]]), np.diff([*cols, grey.shape[1]]))).reshape(-1)
    return cells > cells.mean()


def stream(x: np.ndarray) -> dict[str, Any]:
    thumbs = np.stack([thumbnail(xi) for xi in x])
    hashes = np.stack([average_hash(xi) for xi in x])
    nearest = np.array([rms_distance(thumbs[max(0, i - PER_CLIENT) : i], thumbs[i]).min() for i in range(1, len(x))])
    bits = np.array([(hashes[max(0, i - 512) : i] != hashes[i]).sum(1).min() for i in range(1, len(x))])
    return {
        "images": len(x),
        "thumbnail_nearest_rms_quantiles": {str(q): float(np.quantile(nearest, q)) for q in (0.001, 0.01, 0.05, 0.5)},
        "thumbnail_share_within_near": float((nearest <= NEAR).mean()),
        "average_hash_share_within_6_bits": float((bits <= 6).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/monitor.json"))
    a = ap.parse_args()
    out: dict[str, Any] = {"environment": environment("cpu"), "near": NEAR, "window": PER_CLIENT, "datasets": {}}
    for name in ("mnist", "cifar10"):
        bundle = load_bundle(name)
        data = load_dataset(default_data(bundle.card), "calibration-a", bundle.classes, bundle.input)
        out["datasets"][name] = stream(data.x[: a.limit].numpy())
        print(name, out["datasets"][name], flush=True)
    write(a.out, out)


if __name__ == "__main__":
    main()
