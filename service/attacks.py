"""Adversarial attacks used to measure detection (design.md §7). Images in [0, 1]; untargeted."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step of size ε (Goodfellow et al. 2015)."""
    return (x + eps * _loss_grad(model, x, y).sign()).clamp(0, 1).detach()


def pgd_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 40, step_size: float | None = None, seed: int = 0) -> Tensor:
    """PGD in the L∞ ball of radius ε with a random start (Madry et al. 2018)."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
    adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        adv = adv + alpha * _loss_grad(model, adv, y).sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def quantise(x: Tensor) -> Tensor:
    """round(x·255)/255: what an 8-bit image file would carry."""
    return (x * 255).round() / 255
