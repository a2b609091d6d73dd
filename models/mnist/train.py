"""Train the shipped MNIST bundle from ../shared/data/mnist.npz (training split only).

    python -m models.mnist.train --data ../shared/data/mnist.npz --out models/mnist

Writes model.safetensors and card.json (with the measured test accuracy) into --out.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.mnist.model import build
from models.training import fit, save_bundle
from service.bundle import sha256_file

CLASSES = [str(d) for d in range(10)]


def random_shift(x: Tensor, gen: torch.Generator, max_shift: int = 2) -> Tensor:
    """Translate each image by up to max_shift pixels (zero fill). x: (N, 1, H, W)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (N, 1, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[:, 0][torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)  # (N, 1, H, W)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/mnist.npz"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    d = np.load(a.data)
    x_train = torch.from_numpy(d["x_train"]).float().div(255).unsqueeze(1)  # (60000, 1, 28, 28)
    x_test = torch.from_numpy(d["x_test"]).float().div(255).unsqueeze(1)
    data = (x_train, torch.from_numpy(d["y_train"]).long(), x_test, torch.from_numpy(d["y_test"]).long())
    torch.manual_seed(a.seed)  # the initialisation, as when the shipped weights were trained
    model = build()
    acc = fit(model, data, random_shift, a.epochs, a.batch, a.lr, a.seed, weight_decay=5e-4)
    digest = sha256_file(a.data)
    card = {
        "name": "mnist",
        "version": "1.0.0",
        "architecture": "models.mnist.model:build",
        "classes": CLASSES,
        "input": {"channels": 1, "height": 28, "width": 28, "resize": "bilinear", "background": 0},
        "preprocessing": "grayscale (alpha composited on black), resized to 28x28 if needed, values /255; MNIST polarity: white digit on black",
        "training_data": {"name": "MNIST train (60000)", "file": a.data.name, "sha256": digest},
        "training": {"epochs": a.epochs, "batch_size": a.batch, "max_lr": a.lr, "seed": a.seed, "augmentation": "random shift +-2px"},
        "test_accuracy": round(acc, 4),
        "test_data": {"name": "MNIST test (10000)", "sha256": digest},
    }
    print(json.dumps(save_bundle(model, a.out, card), indent=2))


if __name__ == "__main__":
    main()
