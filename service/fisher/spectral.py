"""The input Fisher G_x = J_xᵀ A J_x = Wᵀ W with rows W_k = √p_k ∇_x log p_k, and its spectrum.

A = diag(p) − ppᵀ = CᵀC with C = diag(√p)(I − 1pᵀ), so CJ has rows √p_k ∇_x log p_k and the
non-zero eigenvalues of G_x (D×D) are those of the small Gram W Wᵀ (m×m).
"""

from collections.abc import Callable

import torch
from torch import Tensor


def top_eigenpair_from_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """λ_max(WᵀW) and its unit eigenvector in input space. w (m, N, D) float64 -> (N,), (N, D)."""
    gram = torch.einsum("ind,jnd->nij", w, w)  # (N, m, m)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    lam = evals[:, -1].clamp_min(0.0)  # (N,)
    u = torch.einsum("ind,ni->nd", w, evecs[:, :, -1])  # (N, D), norm √λ
    norm = u.norm(dim=1, keepdim=True)
    return lam, torch.where(norm > 0, u / norm.clamp_min(1e-300), torch.zeros_like(u))


def lanczos_top(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Largest eigenpair of a batch of PSD operators by Lanczos with full reorthogonalisation.

    matvec maps (N, D) -> (N, D), one symmetric operator per row; v0 (N, D) the start vectors.
    Returns λ_max (N,) and the unit Ritz vector (N, D). Exact after rank + 1 steps.
    """
    d = v0.shape[1]
    steps = min(steps, d)
    q = v0 / v0.norm(dim=1, keepdim=True)
    basis = [q]
    alphas, betas = [], []
    for i in range(steps):
        w = matvec(basis[-1])  # (N, D)
        alpha = (w * basis[-1]).sum(1)  # (N,)
        alphas.append(alpha)
        qs = torch.stack(basis, 1)  # (N, i+1, D)
        w = w - torch.einsum("nid,ni->nd", qs, torch.einsum("nid,nd->ni", qs, w))
        w = w - torch.einsum("nid,ni->nd", qs, torch.einsum("nid,nd->ni", qs, w))  # twice is enough
        beta = w.norm(dim=1)  # (N,)
        scale = alphas[0].abs().clamp_min(1e-300)
        if i == steps - 1 or bool((beta <= 1e-10 * scale).all()):
            break
        betas.append(beta)
        basis.append(torch.where(beta[:, None] > 1e-10 * scale[:, None], w / beta[:, None].clamp_min(1e-300), 0.0))
    k = len(alphas)
    t = torch.diag_embed(torch.stack(alphas, 1))  # (N, k, k)
    if k > 1:
        off = torch.stack(betas[: k - 1], 1)  # (N, k-1)
        t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    u = torch.einsum("nid,ni->nd", torch.stack(basis[:k], 1), evecs[:, :, -1])  # (N, D)
    return evals[:, -1].clamp_min(0.0), u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
