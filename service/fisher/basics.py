"""Forward-only quantities of the predictive distribution, computed stably from logits.

Notation (docs/fisher.md#notation): z (N, K) logits, p = softmax(z), ŷ = argmax p, p̂ = p_ŷ,
s = z_ŷ − logsumexp_{k≠ŷ} z_k = log p̂ − log(1 − p̂).
"""

import torch
from torch import Tensor


def predicted(z: Tensor) -> Tensor:
    """ŷ = argmax_k z_k. (N, K) -> (N,) long."""
    return z.argmax(dim=1)


def log_odds(z: Tensor, y: Tensor) -> Tensor:
    """s = z_y − logsumexp_{k≠y} z_k, never through 1 − p̂. (N, K), (N,) -> (N,)."""
    z_y = z.gather(1, y[:, None]).squeeze(1)  # (N,)
    others = z.scatter(1, y[:, None], float("-inf"))  # (N, K) with z_y masked out
    return z_y - torch.logsumexp(others, dim=1)


def log_odds_cotangent(z: Tensor, y: Tensor) -> Tensor:
    """∂s/∂z: +1 at y, −softmax over the other classes elsewhere. (N, K) -> (N, K)."""
    others = z.scatter(1, y[:, None], float("-inf"))
    return torch.softmax(others, dim=1).neg().scatter(1, y[:, None], 1.0)


def bernoulli_variance(s: Tensor) -> Tensor:
    """p̂(1 − p̂) = σ(s)σ(−s), exact even when p̂ rounds to 1. (N,) -> (N,)."""
    return torch.sigmoid(s) * torch.sigmoid(-s)


def entropy(log_p: Tensor) -> Tensor:
    """−Σ_k p_k log p_k from log-probabilities. (N, K) -> (N,)."""
    return -(log_p.exp() * log_p).sum(dim=1)


def class_cotangents(p: Tensor, classes: Tensor) -> Tensor:
    """Rows e_k − p = ∂ log p_k / ∂z for each chosen class k. (N, K), (N, m) -> (m, N, K)."""
    onehot = torch.zeros(classes.shape[1], *p.shape, dtype=p.dtype, device=p.device)  # (m, N, K)
    onehot.scatter_(2, classes.T[:, :, None], 1.0)
    return onehot - p[None]


def top_classes(p: Tensor, m: int | None) -> Tensor:
    """Indices of the m most probable classes per sample (all K when m is None). (N, K) -> (N, m)."""
    k = p.shape[1] if m is None else min(m, p.shape[1])
    return p.topk(k, dim=1).indices


def predictive(z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """From logits (N, K): p (N, K) float64, ŷ (N,), and the scores of the forward alone —
    `confidence` p̂, `entropy`, `margin` s — float64 (N,) each."""
    z64 = z.detach().double()
    log_p = torch.log_softmax(z64, dim=1)
    p = log_p.exp()
    y = predicted(z64)
    return p, y, {"confidence": p.gather(1, y[:, None]).squeeze(1), "entropy": entropy(log_p), "margin": log_odds(z64, y)}
