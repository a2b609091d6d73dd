"""torch.func fallbacks for models the per-layer identities do not cover (weight sharing, custom
layers, grouped convolutions): per-sample gradients are materialised with vmap over samples."""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from service.fisher.basics import log_odds

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
        pullback = vjp(lambda p: logits(p, x1), params)[1]
        g = vmap(pullback)(cot1)[0]  # name -> (m, *shape)
        flat = torch.cat([t.flatten(1) for t in g.values()], dim=1)  # (m, P)
        return flat @ flat.T  # (m, m)

    return vmap(per_sample)(x, cotangents.transpose(0, 1))


def _log_odds1(z: Tensor, y: Tensor) -> Tensor:
    return log_odds(z[None], y[None])[0]


def directional_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∂_x k with k(x) = ⟨∇_θ s(x), w⟩ and w = ∇_θ s at the given x, held fixed. -> x.shape."""
    params, rest = _split(model)
    logits = _logits_fn(model, rest)

    def s_fn(p: Params, x1: Tensor, y1: Tensor) -> Tensor:
        return _log_odds1(logits(p, x1), y1)

    w = vmap(grad(s_fn), in_dims=(None, 0, 0))(params, x, y)  # name -> (N, *shape)

    def k(x1: Tensor, y1: Tensor, w1: Params) -> Tensor:
        return jvp(lambda p: s_fn(p, x1, y1), (params,), (w1,))[1]

    return vmap(grad(k))(x, y, w)


def directional_value(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """k = ‖∇_θ s‖² per sample (k at the point itself). -> (N,)."""
    params, rest = _split(model)
    logits = _logits_fn(model, rest)

    def sq_norm(x1: Tensor, y1: Tensor) -> Tensor:
        g = grad(lambda p: _log_odds1(logits(p, x1), y1))(params)
        return sum((t * t).sum() for t in g.values())  # type: ignore[return-value]

    return vmap(sq_norm)(x, y)
