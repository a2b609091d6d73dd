"""Adversarial attacks used to measure detection (docs/detection.md#attacks). Images in [0, 1]; untargeted."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.fisher.input_fisher import top_eigenpair


def loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One signed-gradient step of size ε (Goodfellow et al. 2015)."""
    return (x + eps * loss_grad(model, x, y).sign()).clamp(0, 1).detach()


def pgd_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 40, step_size: float | None = None, seed: int = 0) -> Tensor:
    """PGD in the L∞ ball of radius ε with a random start (Madry et al. 2018)."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
    adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        adv = adv + alpha * loss_grad(model, adv, y).sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def quantise(x: Tensor) -> Tensor:
    """round(x·255)/255: what an 8-bit image file would carry."""
    return (x * 255).round() / 255


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 40, step_size: float | None = None, seed: int = 0) -> Tensor:
    """PGD in the L2 ball of radius ε, normalised gradient steps, random start in the ball."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    delta = torch.randn(x.shape, generator=gen).to(x.device)
    delta = delta / l2_norm(delta) * eps * torch.rand(len(x), 1, 1, 1, generator=gen).to(x.device)
    adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        g = loss_grad(model, adv, y)
        adv = adv + alpha * g / l2_norm(g).clamp_min(1e-12)
        d = adv - x
        adv = (x + d * (eps / l2_norm(d)).clamp(max=1.0)).clamp(0, 1).detach()
    return adv


def l2_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def margin(z: Tensor, y: Tensor) -> Tensor:
    """z_y − max_{k≠y} z_k per sample."""
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return z.gather(1, y[:, None]).squeeze(1) - other


def cw_l2(
    model: nn.Module, x: Tensor, y: Tensor, kappa: float = 0.0, steps: int = 100, search: int = 6, c0: float = 1.0, lr: float = 0.05
) -> Tensor:
    """Carlini & Wagner's L2 attack: minimise ‖δ‖² + c·max(z_y − max_{k≠y} z_k, −κ) with Adam, with a
    binary search over c per image; returns the smallest successful image (x where none succeeded).
    δ lives in pixel space and the image is clipped to [0, 1] (the tanh change of variables freezes
    MNIST's saturated pixels at these step counts)."""
    lo, hi = torch.zeros(len(x), device=x.device), torch.full((len(x),), 1e10, device=x.device)
    c = torch.full((len(x),), c0, device=x.device)
    best, best_l2 = x.clone(), torch.full((len(x),), float("inf"), device=x.device)
    for _ in range(search):
        delta = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(steps):
            with torch.enable_grad():
                adv = (x + delta).clamp(0, 1)
                l2 = (adv - x).flatten(1).pow(2).sum(1)
                loss = (l2 + c * margin(model(adv), y).clamp(min=-kappa)).sum()
                opt.zero_grad()
                loss.backward()
            opt.step()
            with torch.no_grad():
                adv = (x + delta).clamp(0, 1)
                ok = margin(model(adv), y) <= -kappa
                l2 = (adv - x).flatten(1).pow(2).sum(1)
                better = ok & (l2 < best_l2)
                best[better], best_l2[better] = adv[better], l2[better]
                success |= ok
        hi = torch.where(success, torch.minimum(hi, c), hi)
        lo = torch.where(success, lo, torch.maximum(lo, c))
        c = torch.where(hi < 1e9, (lo + hi) / 2, c * 10)
    return best.detach()


def deepfool(model: nn.Module, x: Tensor, y: Tensor, steps: int = 50, overshoot: float = 0.02) -> Tensor:
    """Moosavi-Dezfooli et al.: step to the nearest linearised class boundary until the label flips."""
    adv = x.clone()
    r_total = torch.zeros_like(x)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    k = None
    for _ in range(steps):
        xa = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            z = model(xa)
            k = z.shape[1]
            grads = torch.stack([torch.autograd.grad(z[:, j].sum(), xa, retain_graph=j < k - 1)[0] for j in range(k)], 1)  # (N, K, ...)
        active &= z.argmax(1) == y
        if not active.any():
            break
        zy = z.gather(1, y[:, None])  # (N, 1)
        gy = grads[torch.arange(len(x)), y][:, None]  # (N, 1, ...)
        w = grads - gy  # (N, K, ...)
        f = (z - zy).detach()  # (N, K)
        dist = f.abs() / w.flatten(2).norm(dim=2).clamp_min(1e-12)
        dist.scatter_(1, y[:, None], float("inf"))
        j = dist.argmin(1)
        wj = w[torch.arange(len(x)), j]
        r = (dist[torch.arange(len(x)), j] + 1e-4).view(-1, *([1] * (x.dim() - 1))) * wj / l2_norm(wj).clamp_min(1e-12)
        r_total = r_total + r * active.view(-1, *([1] * (x.dim() - 1)))
        adv = (x + (1 + overshoot) * r_total).clamp(0, 1).detach()
    return adv


def square_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float, queries: int = 1000, p_init: float = 0.05, seed: int = 0) -> Tensor:
    """Andriushchenko et al.'s Square attack (L∞, score-based black box: queries only, no gradients)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, c, h, w = x.shape

    @torch.no_grad()
    def loss(a: Tensor) -> Tensor:
        return margin(model(a), y)  # < 0: misclassified

    stripes = eps * (torch.randint(0, 2, (n, c, 1, w), generator=gen).float() * 2 - 1).to(x.device)
    adv = (x + stripes).clamp(0, 1)
    best = loss(adv)
    for i in range(queries):
        todo = best > 0
        if not todo.any():
            break
        p = _square_fraction(p_init, i, queries)
        s = max(1, min(h, round((p * h * w) ** 0.5)))
        r = int(torch.randint(0, h - s + 1, (1,), generator=gen))
        col = int(torch.randint(0, w - s + 1, (1,), generator=gen))
        cand = adv.clone()
        signs = eps * (torch.randint(0, 2, (n, c, 1, 1), generator=gen).float() * 2 - 1).to(x.device)
        cand[:, :, r : r + s, col : col + s] = (x[:, :, r : r + s, col : col + s] + signs).clamp(0, 1)
        new = loss(cand)
        improve = todo & (new < best)
        adv[improve], best[improve] = cand[improve], new[improve]
    return adv


def _square_fraction(p_init: float, i: int, total: int) -> float:
    """The schedule of the square's area fraction (the paper's, rescaled to the query budget)."""
    t = int(i / total * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256)):
        if t <= bound:
            return p_init / div
    return p_init / 512


def ossa(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Zhao et al.'s one-step spectral attack: x + ε·u₁ (L2), u₁ the top eigenvector of G_x, with the
    sign that raises the loss (G_x sees only the direction, not its sign)."""
    _, u = top_eigenpair(model, x)  # (N, C, H, W), unit L2
    g = loss_grad(model, x, y)
    sign = torch.sign((g * u).flatten(1).sum(1)).view(-1, 1, 1, 1)
    sign[sign == 0] = 1
    return (x + eps * sign * u).clamp(0, 1).detach()
