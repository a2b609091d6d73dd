"""Shared training loop for the shipped bundles: one-cycle SGD, augmentation as a batch function,
weights to safetensors and a card with the measured test accuracy."""

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from service.core.bundle import sha256_file
from service.core.scoring import predict
from service.fisher.penalty import input_fisher_trace_estimate, rademacher

Augment = Callable[[Tensor, torch.Generator], Tensor]


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    return float((predict(model, x, batch) == y).float().mean())


def fit(
    model: nn.Module,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    augment: Augment,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    bf16: bool = False,
    decay_1d: bool = True,
    fisher_penalty: float = 0.0,
    channels_last: bool = False,
    eval_every: int = 1,
) -> float:
    """Trains in place; returns the final test accuracy. data = (x_train, y_train, x_test, y_test).
    decay_1d=False exempts biases and normalisation parameters from weight decay; channels_last runs the
    convolutions in NHWC (faster on CPU); the test accuracy is measured every eval_every epochs and after the last.
    fisher_penalty β > 0 adds β · mean tr G_x (one Rademacher probe per image, double backprop;
    service.fisher.penalty) to the loss, with the forward in float32."""
    x_train, y_train, x_test, y_test = data
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)  # type: ignore[call-overload]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if decay_1d or p.dim() > 1]
    no_decay = [p for p in model.parameters() if not decay_1d and p.dim() <= 1]  # biases, BatchNorm γ and β
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9, nesterov=True
    )
    steps = epochs * (len(x_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    acc = 0.0
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        trace_sum = 0.0
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // batch):
            idx = order[i * batch : (i + 1) * batch]
            xb = augment(x_train[idx], gen).contiguous(memory_format=memory_format).requires_grad_(fisher_penalty > 0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and fisher_penalty == 0):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=label_smoothing)
            if fisher_penalty > 0:
                trace = input_fisher_trace_estimate(logits, xb, rademacher(tuple(logits.shape), gen)).mean()
                loss = loss + fisher_penalty * trace
                trace_sum += trace.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % eval_every and epoch + 1 < epochs:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
            continue
        acc = accuracy(model, x_test, y_test)
        penalty = f" mean tr G_x {trace_sum / (len(x_train) // batch):.3g}" if fisher_penalty > 0 else ""
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f}{penalty} test acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return acc


def save_bundle(model: nn.Module, out: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Writes model.safetensors and card.json (with parameter count and weights sha256)."""
    model.eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    card = card | {"param_count": sum(p.numel() for p in model.parameters()), "weights_sha256": sha256_file(weights)}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
