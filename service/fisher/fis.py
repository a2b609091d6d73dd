"""Martin & Elster's Fisher information sensitivity (docs/fisher.md#heatmaps), exact."""

import torch
from torch import Tensor, nn

from service.fisher import basics, functional, persample
from service.fisher.gradients import forward


def fis(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The binary FIS heatmap, one double backward. (N, C, H, W), (N,) -> (N, H, W) float64.

    FIS_i = Σ_j ∂_i(D_v log q_j) ∂_i(D_v q_j), q_0 = p̂, q_1 = 1 − p̂, D_v f = ⟨∇_θ f, v⟩ with
    v = ∇_θ log p̂ held fixed. Since ∇_θ log p̂ = (1 − p̂)∇_θ s, every D_v term is a multiple of
    k = D_v s, and the sum collapses to FIS_i = ∂_i(p̂(1−p̂)k) · ∂_i k. With v = (1 − p̂)w,
    w = ∇_θ s held fixed and k̃ = ⟨∇_θ s(x), w⟩:
        FIS_i = p̂(1 − p̂)³ (∂_i k̃ + (1 − 2p̂) k̃ ∂_i s) ∂_i k̃,
    where nothing cancels and nothing is of size 1 − p̂ until the float64 prefactor.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z, tape = forward(model, x, True)
        s = basics.log_odds(z, y)  # (N,)
        if tape is not None:
            outs = [st.o for st in tape.sites]
            *gs, ds = torch.autograd.grad(s.sum(), [*outs, x], create_graph=True)  # ∂s/∂o_l, ∂s/∂x
            k = sum(
                (persample.layer_inner(st.module, st.a, g, st.a.detach(), g.detach()) for st, g in zip(tape.sites, gs, strict=True)),
                torch.zeros(()),
            )  # (N,) k̃ = ⟨∇_θ s(x), w⟩
            (dk,) = torch.autograd.grad(k.sum(), x)
            k, ds = k.detach(), ds.detach()
        else:
            dk = functional.directional_grad(model, x.detach(), y)
            k = functional.directional_value(model, x.detach(), y)
            (ds,) = torch.autograd.grad(s.sum(), x)
    s64, k64 = s.detach().double(), k.double()
    log_pre = -torch.nn.functional.softplus(-s64) - 3 * torch.nn.functional.softplus(s64)  # log p̂(1 − p̂)³
    shape = (-1, 1, 1, 1)
    dk, ds = dk.double(), ds.double()
    return (log_pre.exp().view(shape) * (dk + ((1 - 2 * torch.sigmoid(s64)) * k64).view(shape) * ds) * dk).sum(1)
