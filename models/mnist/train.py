"""Train the shipped MNIST bundle from ../shared/data/mnist.npz (training split only).

    python -m models.mnist.train --data ../shared/data/mnist.npz --out models/mnist

Writes model.safetensors and card.json (with the measured test accuracy) into --out.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from models.mnist.model import build

CLASSES = [str(d) for d in range(10)]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to max_shift pixels (zero fill). x: (N, 1, H, W)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (N, 1, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[:, 0][torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)  # (N, 1, H, W)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train(data: Path, out: Path, epochs: int, batch: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d = np.load(data)
    x_train = torch.from_numpy(d["x_train"]).float().div(255).unsqueeze(1)  # (60000, 1, 28, 28)
    y_train = torch.from_numpy(d["y_train"]).long()
    x_test = torch.from_numpy(d["x_test"]).float().div(255).unsqueeze(1)
    y_test = torch.from_numpy(d["y_test"]).long()
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(x_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // batch):
            idx = order[i * batch : (i + 1) * batch]
            xb = random_shift(x_train[idx], 2, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    card = {
        "name": "mnist",
        "version": "1.0.0",
        "architecture": "models.mnist.model:build",
        "classes": CLASSES,
        "input": {"channels": 1, "height": 28, "width": 28, "resize": "bilinear", "background": 0},
        "preprocessing": "grayscale (alpha composited on black), resized to 28x28 if needed, values /255; "
        "MNIST polarity: white digit on black",
        "training_data": {"name": "MNIST train (60000)", "file": data.name, "sha256": sha256_file(data)},
        "training": {"epochs": epochs, "batch_size": batch, "max_lr": lr, "seed": seed, "augmentation": "random shift +-2px"},
        "test_accuracy": round(acc, 4),
        "test_data": {"name": "MNIST test (10000)", "sha256": sha256_file(data)},
        "param_count": sum(p.numel() for p in model.parameters()),
        "weights_sha256": sha256_file(weights),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


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
    train(a.data, a.out, a.epochs, a.batch, a.lr, a.seed)


if __name__ == "__main__":
    main()
