"""The parameter Fisher F_θ = J_θᵀ A J_θ (docs/fisher.md#parameter-fisher) from per-sample products.

Inputs are, per sample, diag (N, m) = ‖∇_θ c_j·z‖² and cross (N, m) = ⟨∇_θ c_j·z, ∇_θ log p̂⟩ for the
cotangent rows c_j: row 0 is ∂s/∂z when `binary` scores are wanted, then e_k − p for the chosen
classes (ŷ first). The products come from `persample` (per-layer identities) or `functional`.
"""

import torch
from torch import Tensor


def binary(diag_s: Tensor, var: Tensor) -> dict[str, Tensor]:
    """`fisher_param_binary` p̂(1 − p̂)‖∇_θ s‖² from ‖∇_θ s‖² (N,) and p̂(1 − p̂) (N,)."""
    return {"fisher_param_binary": var * diag_s}


def trace(diag: Tensor, pk: Tensor) -> dict[str, Tensor]:
    """`fisher_param_trace` Σ_k p_k ‖∇_θ log p_k‖² from diag (N, m) and p_k (m, N)."""
    return {"fisher_param_trace": (pk.T * diag).sum(1)}


def form(diag: Tensor, cross: Tensor, pk: Tensor) -> dict[str, Tensor]:
    """`fisher_form` vᵀF_θv / ‖v‖², v = ∇_θ log p̂: Σ_k p_k ⟨∇_θ log p_k, v⟩² / ‖v‖² (0 where v = 0).
    diag, cross (N, m) with column 0 the predicted class; pk (m, N)."""
    vv = diag[:, 0]  # ‖v‖²
    quad = (pk.T * cross * cross).sum(1)
    return {"fisher_form": torch.where(vv > 0, quad / vv.clamp_min(1e-300), torch.zeros_like(vv))}
