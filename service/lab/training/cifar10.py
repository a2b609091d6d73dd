"""Train a CIFAR-10 bundle from ../shared/data/cifar10_jpeg.npz, training split only.

    fisherguard train --bundle cifar10 --arch air --epochs 20 --out models/cifar10      # the shipped bundle

--arch air: the airbench-style residual net (model.AirResNet) with fit_air's recipe (2 px reflect-padded
crops, flips, bf16 autocast; ~105 s per epoch on 2 cores). --arch resnet20 / resnet20-wide: ResNet-20
with one-cycle SGD, 4 px zero-padded crops and flips (--bf16 for autocast; the only recipe with
--fisher-penalty). Writes model.safetensors and card.json (with the measured test accuracy) into --out.
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cifar10.model import AirResNet, build, build_air, build_wide
from service.core.bundle import sha256_file
from service.lab.data import jpeg_split
from service.lab.training.loop import accuracy, fit, save_bundle


def crop_flip(x: Tensor, gen: torch.Generator, pad: int = 4, mode: str = "constant", flip: Tensor | None = None) -> Tensor:
    """Random H×W crops of the padded images (zeros, or mode="reflect") and horizontal flips, random
    unless a (N,) bool mask flip is given. x (N, C, H, W)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode=mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    flip = torch.rand(n, generator=gen) < 0.5 if flip is None else flip
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def whiten_from(conv: nn.Conv2d, x: Tensor, eps: float = 5e-4) -> None:
    """Sets a 2k-channel k×k conv to patch whitening of x (N, C, H, W): its filters are the eigenvectors
    v_i of the covariance of all k×k patches scaled by 1/√(λ_i + eps), and their negatives."""
    k = conv.kernel_size[0]
    patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(0, 2).double()  # (N·P, C·k·k)
    evals, evecs = torch.linalg.eigh(torch.cov(patches.T))  # (C·k·k,), (C·k·k, C·k·k)
    w = (evecs.T / (evals + eps).sqrt()[:, None]).view(-1, x.shape[1], k, k)  # (C·k·k, C, k, k)
    conv.weight.data.copy_(torch.cat([w, -w]))


def fit_air(
    model: AirResNet,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    epochs: int,
    seed: int,
    batch: int = 1000,
    lr: float = 10.0,
    momentum: float = 0.85,
    weight_decay: float = 0.015,
    bias_scaler: float = 64.0,
    label_smoothing: float = 0.2,
    eval_every: int = 5,
) -> float:
    """airbench94's recipe (without lookahead, progressive freezing and test-time augmentation): whitening
    and identity (dirac) initialisation, frozen whitening filters and BatchNorm scales, Nesterov SGD with
    the learning rate and weight decay given per 1024 examples (summed loss), BatchNorm biases at 64× the
    learning rate, a triangular schedule (0.2 → 1 at 20% → 0), label smoothing, 2 px reflect-padded random
    crops, alternating flips (a random half of the images is mirrored in even epochs, the other half in odd
    ones), bf16 autocast. Trains in place; returns the final test accuracy."""
    x_train, y_train, x_test, y_test = data
    gen = torch.Generator().manual_seed(seed)
    mirrored = torch.rand(len(x_train), generator=gen) < 0.5  # (N,) flipped in even epochs
    with torch.no_grad():
        whiten_from(model.whiten, model.norm(x_train[:5000]))
        for conv in (m for m in model.groups.modules() if isinstance(m, nn.Conv2d)):
            nn.init.dirac_(conv.weight[: conv.in_channels])  # the first cin filters pass their input through
    model.whiten.weight.requires_grad_(False)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.weight.requires_grad_(False)
    biases = [bn.bias for bn in norms]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not b for b in biases)]
    step_scale = 1024 * (1 + 1 / (1 - momentum))  # how much larger Nesterov steps are than the gradient
    lr_w, lr_b, wd = lr / step_scale, lr * bias_scaler / step_scale, weight_decay * batch / step_scale
    opt = torch.optim.SGD(
        [{"params": biases, "lr": lr_b, "weight_decay": wd / lr_b}, {"params": others, "lr": lr_w, "weight_decay": wd / lr_w}],
        momentum=momentum,
        nesterov=True,
    )
    steps = epochs * (len(x_train) // batch)
    peak = int(0.2 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.2 + 0.8 * i / peak if i < peak else (steps - i) / (steps - peak))
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // batch):
            idx = order[i * batch : (i + 1) * batch]
            flip = mirrored[idx] ^ bool(epoch % 2)
            xb = crop_flip(x_train[idx], gen, pad=2, mode="reflect", flip=flip).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(xb)  # (B, K)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=label_smoothing, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        line = f"epoch {epoch + 1}/{epochs} loss {loss.item() / batch:.4f}"
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            acc = accuracy(model, x_test, y_test)
            line += f" test acc {acc:.4f}"
        print(f"{line} ({time.time() - t0:.0f}s)", flush=True)
    return acc


ARCHITECTURES = {"air": "build_air", "resnet20": "build", "resnet20-wide": "build_wide"}


def train(
    data: Path,
    out: Path,
    arch: str = "air",
    epochs: int = 20,
    batch: int = 128,
    lr: float = 0.2,
    seed: int = 0,
    fisher_penalty: float = 0.0,
    bf16: bool = True,
) -> dict:  # type: ignore[type-arg]
    """Trains one architecture of ARCHITECTURES and writes the bundle into out; returns its card.
    "air" (the shipped net) uses fit_air's recipe (batch and lr are per its defaults); the ResNet-20s use
    one-cycle SGD with batch and lr, bf16 autocast only without the Fisher penalty."""
    torch.set_num_threads(2)
    with np.load(data) as d:
        x_train, y_train = jpeg_split(d, "train")
        x_test, y_test = jpeg_split(d, "test")
        classes = [str(c) for c in d["classes"]]
    tensors = (x_train, y_train, x_test, y_test)
    training: dict[str, object] = {"epochs": epochs, "seed": seed}
    model: nn.Module
    if arch == "air":
        if fisher_penalty > 0:
            raise ValueError(f"--fisher-penalty {fisher_penalty}: the penalty is implemented for the ResNet-20 recipe only")
        torch.manual_seed(seed)  # the initialisation; the ResNet-20s keep torch's default state, as for their logged runs
        model = build_air()
        acc = fit_air(model, tensors, epochs, seed)  # type: ignore[arg-type]
        training |= {
            "recipe": "airbench94 (Jordan 2024) without lookahead, progressive freezing or TTA: whitening + dirac init, "
            "Nesterov SGD lr 10 / wd 0.015 per 1024 examples, momentum 0.85, BN biases 64x lr, triangular schedule",
            "batch_size": 1000,
            "label_smoothing": 0.2,
            "augmentation": "random crop (2 px reflect pad) + alternating horizontal flip",
            "bf16_autocast": True,
        }
    else:
        model = build_wide() if arch == "resnet20-wide" else build()
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
            channels_last=arch == "resnet20-wide",
            eval_every=5 if arch == "resnet20-wide" else 1,
        )
        training |= {
            "batch_size": batch,
            "max_lr": lr,
            "label_smoothing": 0.1,
            "augmentation": "random crop (4 px zero pad) + horizontal flip",
            "bf16_autocast": bf16 and fisher_penalty == 0,
        }
    if fisher_penalty > 0:
        training |= {
            "fisher_penalty": fisher_penalty,
            "fisher_penalty_estimator": "tr G_x, one Rademacher probe per image, double backprop",
        }
    digest = sha256_file(data)
    card = {
        "name": out.resolve().name,
        "version": "2.0.0",
        "architecture": f"models.cifar10.model:{ARCHITECTURES[arch]}",
        "classes": classes,
        "input": {"channels": 3, "height": 32, "width": 32, "resize": "bilinear", "background": 0},
        "preprocessing": "RGB (alpha composited on black), resized to 32x32 if needed, values /255",
        "training_data": {"name": "CIFAR-10 train (50000, JPEG export)", "file": data.name, "sha256": digest},
        "training": training,
        "test_accuracy": round(acc, 4),
        "test_data": {"name": "CIFAR-10 test (10000, JPEG export)", "sha256": digest},
    }
    return save_bundle(model, out, card)
