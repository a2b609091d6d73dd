"""The input Fisher G_x = J_xᵀ A J_x (docs/fisher.md#input-fisher) from input gradients.

Each function takes float64 input gradients flattened to (·, N, D) and returns named per-image
values: scores (N,) and heatmaps (N, H, W), channels summed.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from service.fisher import basics
from service.fisher.gradients import cotangents, eval_mode, normalise, vjps
from service.fisher.spectral import lanczos_top, top_eigenpair_from_rows

Matvec = Callable[[Tensor], Tensor]


def binary(gs: Tensor, var: Tensor, shape: tuple[int, int, int, int]) -> dict[str, Tensor]:
    """From ∇_x s (N, D) and p̂(1 − p̂) (N,): `sensitivity` ‖∇_x s‖², `fisher_input_binary`
    p̂(1 − p̂)‖∇_x s‖², and the `saliency` heatmap (∂_i s)²."""
    sq = gs * gs  # (N, D)
    sens = sq.sum(1)
    return {"sensitivity": sens, "fisher_input_binary": var * sens, "saliency": sq.view(shape).sum(1)}


def trace_and_diagonal(gk: Tensor, pk: Tensor, shape: tuple[int, int, int, int]) -> dict[str, Tensor]:
    """From ∇_x log p_k (m, N, D) and p_k (m, N): `fisher_input_trace` Σ_k p_k ‖∇_x log p_k‖² and
    the `fisher_diag` heatmap Σ_k p_k (∂_i log p_k)²."""
    sq = gk * gk
    return {
        "fisher_input_trace": torch.einsum("kn,knd->n", pk, sq),
        "fisher_diag": torch.einsum("kn,knd->nd", pk, sq).view(shape).sum(1),
    }


def top_eigen(gk: Tensor, pk: Tensor, shape: tuple[int, int, int, int], matvec: Matvec | None, steps: int) -> dict[str, Tensor]:
    """`fisher_input_eig` λ_max(G_x) and the `eigvec` heatmap |u₁|: exactly from the m×m Gram of the
    rows √p_k ∇_x log p_k, or by Lanczos on G_x v when a matvec is given."""
    if matvec is not None:
        lam, u = lanczos_top(matvec, gk[0], steps)
    else:
        lam, u = top_eigenpair_from_rows(pk.sqrt()[:, :, None] * gk)
    return {"fisher_input_eig": lam, "eigvec": u.abs().view(shape).sum(1)}


def matvec(model: nn.Module, x: Tensor, z: Tensor, p: Tensor) -> Matvec:
    """v ↦ G_x v = J_xᵀ A J_x v per sample: one JVP and one VJP (x the recorded input of logits z).
    (N, D) float64 -> (N, D) float64."""
    xd = x.detach()
    pf = p.float()

    def apply(v: Tensor) -> Tensor:
        jv = torch.func.jvp(model, (xd,), (v.float().view_as(xd),))[1]  # (N, K)
        av = pf * jv - pf * (pf * jv).sum(1, keepdim=True)  # A J v
        (gv,) = torch.autograd.grad(z, x, av, retain_graph=True)
        return gv.double().flatten(1)

    return apply


def top_eigenpair(model: nn.Module, x: Tensor, top_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """λ_max(G_x) (N,) float64 and the signed unit top eigenvector u₁ (N, C, H, W) float32: the
    direction of OSSA (Zhao et al.). Exact from the m×m Gram of the rows √p_k ∇_x log p_k."""
    with eval_mode(model):
        x = x.detach().to(dtype=torch.float32).requires_grad_(True)
        with torch.enable_grad():
            z = model(x)
        z64 = z.detach().double()
        p = torch.softmax(z64, 1)
        classes = basics.top_classes(p, top_classes)
        cot, scale = normalise(cotangents(z64, p, basics.predicted(z64), classes, need_s=False))
        gx = torch.stack([g[0] for g in vjps(z, [x], cot)]).double().flatten(2) * scale[:, :, None]  # (m, N, D)
        lam, u = top_eigenpair_from_rows(p.gather(1, classes).T.sqrt()[:, :, None] * gx)
    return lam, u.float().view_as(x)
