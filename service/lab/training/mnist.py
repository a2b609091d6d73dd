"""Train the shipped MNIST bundle from ../shared/data/mnist.npz (training split only).

    fisherguard train --bundle mnist --data ../shared/data/mnist.npz --out models/mnist

Writes model.safetensors and card.json (with the measured test accuracy) into --out.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.mnist.model import build
from service.core.bundle import sha256_file
from service.lab.training.loop import fit, save_bundle

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


def train(data: Path, out: Path, epochs: int = 8, batch: int = 128, lr: float = 0.1, seed: int = 0, fisher_penalty: float = 0.0) -> dict:  # type: ignore[type-arg]
    """The shipped recipe (fisher_penalty 0 reproduces models/mnist); writes the bundle into out, returns its card."""
    torch.set_num_threads(2)
    d = np.load(data)
    x_train = torch.from_numpy(d["x_train"]).float().div(255).unsqueeze(1)  # (60000, 1, 28, 28)
    x_test = torch.from_numpy(d["x_test"]).float().div(255).unsqueeze(1)
    tensors = (x_train, torch.from_numpy(d["y_train"]).long(), x_test, torch.from_numpy(d["y_test"]).long())
    torch.manual_seed(seed)  # the initialisation, as when the shipped weights were trained
    model = build()
    acc = fit(model, tensors, random_shift, epochs, batch, lr, seed, weight_decay=5e-4, fisher_penalty=fisher_penalty)
    digest = sha256_file(data)
    training = {"epochs": epochs, "batch_size": batch, "max_lr": lr, "seed": seed, "augmentation": "random shift +-2px"}
    if fisher_penalty > 0:
        training |= {
            "fisher_penalty": fisher_penalty,
            "fisher_penalty_estimator": "tr G_x, one Rademacher probe per image, double backprop",
        }
    card = {
        "name": out.resolve().name,
        "version": "1.0.0",
        "architecture": "models.mnist.model:build",
        "classes": CLASSES,
        "input": {"channels": 1, "height": 28, "width": 28, "resize": "bilinear", "background": 0},
        "preprocessing": "grayscale (alpha composited on black), resized to 28x28 if needed, values /255; MNIST polarity: white digit on black",
        "training_data": {"name": "MNIST train (60000)", "file": data.name, "sha256": digest},
        "training": training,
        "test_accuracy": round(acc, 4),
        "test_data": {"name": "MNIST test (10000)", "sha256": digest},
    }
    return save_bundle(model, out, card)
