"""torch.func fallbacks for models the per-layer identities do not cover (weight sharing, custom
layers, grouped convolutions): per-sample gradients are materialised with vmap over samples."""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

Params = dict[str, Tensor]


def _split(model: nn.Module) -> tuple[Params, Params]:
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = dict(model.named_buffers())
    return params, {**frozen, **buffers}


def _logits_fn(model: nn.Module, rest: Params) -> Callable[[Params, Tensor], Tensor]:
    def logits(p: Params, x1: Tensor) -> Tensor:
        return functional_call(model, (p, rest), (x1[None],))[0]  # (K,)

    return logits


def param_gram(model: nn.Module, x: Tensor, cotangents: Tensor) -> Tensor:
    """Per-sample Gram of ∇_θ(c_i·z) over cotangents c. x (N, ...), cotangents (m, N, K) -> (N, m, m)."""
    params, rest = _split(model)
    logits = _logits_fn(model, rest)

    def per_sample(x1: Tensor, cot1: Tensor) -> Tensor:  # cot1 (m, K)
        _, pullback = vjp(lambda p: logits(p, x1), params)
        g = vmap(pullback)(cot1)[0]  # name -> (m, *shape)
        flat = torch.cat([t.flatten(1) for t in g.values()], dim=1)  # (m, P)
        return flat @ flat.T  # (m, m)

    return vmap(per_sample)(x, cotangents.transpose(0, 1))


def directional_grad(model: nn.Module, x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """∂_x h with h(x) = ⟨∇_θ f(x), v⟩, f = log p_y / scale, v = ∇_θ f at the given x, held fixed. -> x.shape."""
    params, rest = _split(model)
    logits = _logits_fn(model, rest)

    def log_py(p: Params, x1: Tensor, y1: Tensor, c1: Tensor) -> Tensor:
        return torch.log_softmax(logits(p, x1), dim=0).gather(0, y1[None])[0] / c1

    v = vmap(grad(log_py), in_dims=(None, 0, 0, 0))(params, x, y, scale)  # name -> (N, *shape)

    def h(x1: Tensor, y1: Tensor, c1: Tensor, v1: Params) -> Tensor:
        return jvp(lambda p: log_py(p, x1, y1, c1), (params,), (v1,))[1]

    return vmap(grad(h))(x, y, scale, v)


def directional_value(model: nn.Module, x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """h = ‖∇_θ log p_y / scale‖² per sample (the value of h at the point). -> (N,)."""
    params, rest = _split(model)
    logits = _logits_fn(model, rest)

    def sq_norm(x1: Tensor, y1: Tensor, c1: Tensor) -> Tensor:
        g = grad(lambda p: torch.log_softmax(logits(p, x1), dim=0).gather(0, y1[None])[0] / c1)(params)
        return sum((t * t).sum() for t in g.values())  # type: ignore[return-value]

    return vmap(sq_norm)(x, y, scale)
