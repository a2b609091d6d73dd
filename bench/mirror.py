"""Test accuracy of a bundle with and without mirror-image averaging (logits of x and of x flipped
left-right, averaged), on all 10,000 test images; JSON with the environment:

    python -m bench.mirror --model bench/results/cifar10-wide --out bench/results/cifar10-wide/mirror.json
"""

import argparse
from pathlib import Path

import torch

from bench.common import environment, write
from service.core.batches import cat_batches
from service.core.bundle import load_bundle
from service.lab.data import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cifar10_jpeg.npz"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    bundle = load_bundle(a.model)
    data = load_dataset(a.data, "all", bundle.classes, bundle.input)
    with torch.no_grad():
        z = cat_batches(bundle.model, data.x, batch=500)  # (N, K)
        zf = cat_batches(lambda xb: bundle.model(xb.flip(-1)), data.x, batch=500)  # (N, K)
    result = {
        "environment": environment("cpu"),
        "model": bundle.name,
        "weights_sha256": bundle.weights_sha256,
        "images": len(data.y),
        "accuracy": float((z.argmax(1) == data.y).float().mean()),
        "accuracy_mirror_averaged": float(((z + zf).argmax(1) == data.y).float().mean()),
    }
    write(a.out, result)
    print(result)


if __name__ == "__main__":
    main()
