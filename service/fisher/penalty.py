"""Training-time Fisher penalty (Shen et al., arXiv 1909.06137): β·tr G_x added to the loss.

tr G_x = Σ_k p_k ‖∇ₓ log p_k‖² = ‖C J‖²_F with J = ∂z/∂x (K, D) and C = diag(√p)(I − 1pᵀ), since
CᵀC = diag(p) − ppᵀ = A and G_x = JᵀAJ. For a probe u (K,) with E[uuᵀ] = I (Rademacher signs),

    E_u ‖Jᵀ Cᵀ u‖² = tr(Jᵀ CᵀC J) = tr G_x,     Cᵀu = √p ⊙ u − p · Σ_k √p_k u_k,

one vector-Jacobian product per image instead of K. The probe does not depend on θ, so the estimate
*and its gradient* (by double backprop, `create_graph=True`) are unbiased for tr G_x and ∇_θ tr G_x.
"""

import torch
from torch import Tensor


def trace_probe_cotangent(z: Tensor, u: Tensor) -> Tensor:
    """Cᵀu = √p ⊙ u − p (√p · u), with √p = exp(½ log_softmax z) (finite gradient at p → 0).
    z (N, K) logits, u (N, K) probes -> (N, K), differentiable in z."""
    log_p = torch.log_softmax(z, dim=1)  # (N, K)
    w = torch.exp(0.5 * log_p) * u  # (N, K)
    return w - log_p.exp() * w.sum(dim=1, keepdim=True)


def input_fisher_trace_estimate(z: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """‖Jᵀ Cᵀ u‖² per image: unbiased for tr G_x over probes u, differentiable in θ and x.
    z (N, K) = model(x), x (N, C, H, W) with requires_grad, u (N, K) -> (N,).

    In train mode BatchNorm couples the batch, so J then includes the O(1/N) cross-image terms."""
    (g,) = torch.autograd.grad(z, x, grad_outputs=trace_probe_cotangent(z, u), create_graph=True)  # (N, C, H, W)
    return g.flatten(1).pow(2).sum(dim=1)


def rademacher(shape: tuple[int, ...], gen: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Independent ±1 signs (float32)."""
    return torch.randint(0, 2, shape, generator=gen).to(device=device, dtype=torch.float32).mul_(2).sub_(1)
