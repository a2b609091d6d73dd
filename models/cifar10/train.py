"""Train the shipped CIFAR-10 bundle (ResNet-20) from ../shared/data/cifar10_jpeg.npz, training split only.

    python -m models.cifar10.train --data ../shared/data/cifar10_jpeg.npz --out models/cifar10

Random crops (4 px zero padding) and horizontal flips; one-cycle SGD; bf16 autocast on CPUs that
have it (--bf16, as for the shipped weights). Writes model.safetensors and card.json (with the measured test accuracy) into --out.
"""

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from models.cifar10.model import build, build_wide
from models.training import fit, save_bundle
from service.bundle import sha256_file


def decode_split(d: np.lib.npyio.NpzFile, split: str) -> tuple[Tensor, Tensor]:
    """The JPEG bytes of one split -> (N, 3, 32, 32) float in [0, 1], (N,) labels."""
    raw, off = d[f"{split}_jpeg"], d[f"{split}_offsets"]
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(raw[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in range(len(off) - 1)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).contiguous(), torch.from_numpy(d[f"{split}_labels"]).long()


def crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random 32×32 crops of the zero-padded images and random horizontal flips. x (N, C, H, W)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def train(
    data: Path,
    out: Path,
    epochs: int = 40,
    batch: int = 128,
    lr: float = 0.2,
    seed: int = 0,
    fisher_penalty: float = 0.0,
    bf16: bool = True,
    wide: bool = False,
) -> dict:  # type: ignore[type-arg]
    """The shipped recipe (fisher_penalty 0 reproduces models/cifar10); writes the bundle into out, returns its card.
    bf16 autocast applies only without the penalty (the double backward runs in float32)."""
    torch.set_num_threads(2)
    with np.load(data) as d:
        x_train, y_train = decode_split(d, "train")
        x_test, y_test = decode_split(d, "test")
        classes = [str(c) for c in d["classes"]]
    model = (
        build_wide() if wide else build()
    )  # initialised from torch's default generator state, as for the shipped weights; fit() seeds the rest
    tensors = (x_train, y_train, x_test, y_test)
    acc = fit(
        model,
        tensors,
        crop_flip,
        epochs,
        batch,
        lr,
        seed,
        5e-4,
        label_smoothing=0.1,
        bf16=bf16,
        decay_1d=False,
        fisher_penalty=fisher_penalty,
        channels_last=wide,
        eval_every=5 if wide else 1,
    )
    digest = sha256_file(data)
    training = {
        "epochs": epochs,
        "batch_size": batch,
        "max_lr": lr,
        "seed": seed,
        "label_smoothing": 0.1,
        "augmentation": "random crop (4 px zero pad) + horizontal flip",
        "bf16_autocast": bf16 and fisher_penalty == 0,
    }
    if fisher_penalty > 0:
        training |= {
            "fisher_penalty": fisher_penalty,
            "fisher_penalty_estimator": "tr G_x, one Rademacher probe per image, double backprop",
        }
    card = {
        "name": out.resolve().name,
        "version": "1.0.0",
        "architecture": "models.cifar10.model:build_wide" if wide else "models.cifar10.model:build",
        "classes": classes,
        "input": {"channels": 3, "height": 32, "width": 32, "resize": "bilinear", "background": 0},
        "preprocessing": "RGB (alpha composited on black), resized to 32x32 if needed, values /255",
        "training_data": {"name": "CIFAR-10 train (50000, JPEG export)", "file": data.name, "sha256": digest},
        "training": training,
        "test_accuracy": round(acc, 4),
        "test_data": {"name": "CIFAR-10 test (10000, JPEG export)", "sha256": digest},
    }
    return save_bundle(model, out, card)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cifar10_jpeg.npz"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward (CPUs with AVX512-BF16/AMX)")
    ap.add_argument("--wide", action="store_true", help="build_wide (width 32, channels-last; not the shipped net)")
    ap.add_argument("--fisher-penalty", type=float, default=0.0, help="β of the β·tr G_x training penalty")
    a = ap.parse_args()
    print(json.dumps(train(a.data, a.out, a.epochs, a.batch, a.lr, a.seed, a.fisher_penalty, a.bf16, a.wide), indent=2))


if __name__ == "__main__":
    main()
