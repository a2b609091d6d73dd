"""Slow, obviously correct float64 references: loops over samples and classes with autograd.grad,
full D×D and P×P Fisher matrices. Used only by the tests."""

import copy

import torch
from torch import Tensor, nn


def double(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def _flat(grads: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def reference(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Every score and heatmap of docs/fisher.md (except the noise KL) for each image, one at a time."""
    m = double(model)
    params = [p for p in m.parameters() if p.requires_grad]
    rows: list[dict[str, Tensor]] = []
    for xn in x.double():
        xn = xn[None].clone().requires_grad_(True)
        z = m(xn)[0]  # (K,)
        k = z.shape[0]
        p = torch.softmax(z, 0)
        y = int(p.argmax())
        log_p = torch.log_softmax(z, 0)
        log_1mp = torch.stack([torch.logsumexp(torch.cat([z[:i], z[i + 1 :]]), 0) for i in range(k)]) - torch.logsumexp(z, 0)
        s = log_p[y] - log_1mp[y]  # log p̂ − log(1 − p̂), with 1 − p_k summed from the other classes
        jx = torch.stack([torch.autograd.grad(z[i], xn, retain_graph=True)[0].reshape(-1) for i in range(k)])  # (K, D)
        jt = torch.stack([_flat(torch.autograd.grad(z[i], params, retain_graph=True)) for i in range(k)])  # (K, P)
        a = torch.diag(p * log_1mp.exp()) - torch.outer(p, p).fill_diagonal_(0.0)  # diag(p) − ppᵀ
        gx = jx.T @ a @ jx  # (D, D)
        ft = jt.T @ a @ jt  # (P, P)
        ds = torch.autograd.grad(s, xn, retain_graph=True)[0].reshape(-1)
        dst = _flat(torch.autograd.grad(s, params, retain_graph=True))
        rest = p.detach().clone()
        rest[y] = 0.0
        v = (jt[y] - jt).T @ rest  # ∇_θ log p̂ = Σ_{k≠ŷ} p_k (∇z_ŷ − ∇z_k), no 1 − p̂ formed
        evals, evecs = torch.linalg.eigh(gx)
        var = p[y] * log_1mp[y].exp()
        c, h, w = xn.shape[1:]
        rows.append(
            {
                "confidence": p[y].detach(),
                "entropy": -(p * log_p).sum().detach(),
                "margin": s.detach(),
                "sensitivity": ds @ ds,
                "fisher_input_binary": var.detach() * (ds @ ds),
                "fisher_input_trace": torch.trace(gx).detach(),
                "fisher_input_eig": evals[-1].detach(),
                "fisher_param_binary": var.detach() * (dst @ dst),
                "fisher_param_trace": torch.trace(ft).detach(),
                "fisher_form": (v @ ft @ v / (v @ v)).detach(),
                "saliency": (ds**2).view(c, h, w).sum(0),
                "fisher_diag": torch.diagonal(gx).detach().view(c, h, w).sum(0),
                "eigvec": evecs[:, -1].abs().detach().view(c, h, w).sum(0),
                "fis": fis_reference(m, xn, y, v).view(c, h, w).sum(0),
            }
        )
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def _directional(m: nn.Module, xn: Tensor, y: int, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(D_v log q0, D_v q0, D_v log q1, D_v q1) as functions of xn, differentiable."""
    params = [p for p in m.parameters() if p.requires_grad]
    z = m(xn)[0]
    q0 = torch.softmax(z, 0)[y]
    q1 = torch.exp(torch.logsumexp(torch.cat([z[:y], z[y + 1 :]]), 0) - torch.logsumexp(z, 0))  # 1 − p̂
    out = []
    for f in (torch.log(q0), q0, torch.log(q1), q1):
        out.append(_flat(torch.autograd.grad(f, params, create_graph=True)) @ v)
    return out[0], out[1], out[2], out[3]


def fis_reference(m: nn.Module, xn: Tensor, y: int, v: Tensor) -> Tensor:
    """FIS_i = Σ_j ∂_i(D_v log q_j) ∂_i(D_v q_j) by double backward, per input value. -> (D,)."""
    dl0, dq0, dl1, dq1 = _directional(m, xn, y, v)
    g = [torch.autograd.grad(f, xn, retain_graph=True)[0].reshape(-1) for f in (dl0, dq0, dl1, dq1)]
    return (g[0] * g[1] + g[2] * g[3]).detach()


def fis_finite_difference(m: nn.Module, xn: Tensor, y: int, v: Tensor, eps: float = 1e-5) -> Tensor:
    """The same FIS from central differences of the directional derivatives, coordinate by coordinate."""
    d = xn.numel()
    out = torch.zeros(d, dtype=torch.float64)
    for i in range(d):
        e = torch.zeros(d, dtype=torch.float64)
        e[i] = eps
        plus = _directional(m, (xn.detach().reshape(-1) + e).view_as(xn), y, v)
        minus = _directional(m, (xn.detach().reshape(-1) - e).view_as(xn), y, v)
        diff = [(a - b).detach() / (2 * eps) for a, b in zip(plus, minus, strict=True)]
        out[i] = diff[0] * diff[1] + diff[2] * diff[3]
    return out


def profile_reference(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, list[str]]:
    """Per image and per parametrised module (in the order of its first call): ‖∇_{θ_l} s‖² over the
    module's own parameters, and ‖∇_{o_l} s‖² of its output, one image at a time in float64."""
    m = double(model)
    order: list[str] = []
    outs: dict[str, Tensor] = {}
    named = [(n, mod) for n, mod in m.named_modules() if any(p.requires_grad for p in mod.parameters(recurse=False))]

    def keep(name: str, o: Tensor) -> Tensor:
        if name not in outs:
            order.append(name)
        outs[name] = o
        return o.clone()  # downstream in-place ops (ReLU(inplace=True), `out += x`) must not change what we keep

    hooks = [mod.register_forward_hook(lambda _m, _a, o, name=name: keep(name, o)) for name, mod in named]
    params, features = [], []
    try:
        for xn in x.double():
            order.clear()
            outs.clear()
            z = m(xn[None])[0]
            y = int(z.argmax())
            s = z[y] - torch.logsumexp(torch.cat([z[:y], z[y + 1 :]]), 0)
            mods = dict(named)
            layer_params = [[p for p in mods[name].parameters(recurse=False) if p.requires_grad] for name in order]
            grads = torch.autograd.grad(s, [p for ps in layer_params for p in ps] + [outs[name] for name in order])
            flat = iter(grads)
            params.append(torch.stack([sum((next(flat) ** 2).sum() for _ in ps) for ps in layer_params]))  # type: ignore[misc]
            features.append(torch.stack([(next(flat) ** 2).sum() for _ in order]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(params).detach(), torch.stack(features).detach(), list(order)
