"""The layer-wise Fisher profile (docs/fisher.md#profile): where in the network the predicted class's
log-odds is sensitive, from the one backward of ∂s/∂z.

For every parametrised layer l (a call of a Linear, Conv2d or BatchNorm, in forward order):

    param_l   = ‖∇_{θ_l} s‖²   the per-layer Fisher of the binary model, per unit of Bernoulli variance
    feature_l = ‖∇_{o_l} s‖²   the sensitivity of s to the layer's output o_l

(GraN, Lust & Condurache 2020, detects with the first). Both are multiplied by p̂(1 − p̂) in the Fisher
of the Bernoulli q = p̂, and by (1 − p̂)² in ‖∇ log p̂‖²; those factors are the same in every layer, so
the profile's shape — each layer's share — does not collapse when p̂ → 1 as the magnitudes do.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from service.fisher import basics, persample
from service.fisher.gradients import eval_mode, forward, normalise


@dataclass
class Profile:
    """param (N, L) and feature (N, L) float64, one column per recorded layer call, in forward order;
    layers: their module names."""

    param: Tensor
    feature: Tensor
    layers: list[str]

    def log_shares(self) -> Tensor:
        """[log10 param_l / Σ param, log10 feature_l / Σ feature] (N, 2L): the scale-free shape."""
        return torch.cat([_log_share(self.param), _log_share(self.feature)], 1)

    def log_totals(self) -> Tensor:
        """[log10 Σ param, log10 Σ feature] (N, 2): the magnitudes."""
        return torch.stack([self.param.sum(1), self.feature.sum(1)], 1).clamp_min(1e-30).log10()


def _log_share(v: Tensor) -> Tensor:
    return (v.clamp_min(1e-300) / v.sum(1, keepdim=True).clamp_min(1e-300)).log10().clamp_min(-30.0)


def profile(model: nn.Module, x: Tensor) -> Profile:
    """The profile of images x (N, C, H, W) in [0, 1]: one recorded forward, one backward of ∂s/∂z
    (rescaled to max-norm 1 for the float32 backward, scaled back in float64). Models the per-layer
    identities do not cover raise ValueError."""
    if not persample.hookable(model):
        raise ValueError("the Fisher profile needs a model whose parametrised layers are Linear, Conv2d (groups=1) or BatchNorm")
    names = {id(m): n for n, m in model.named_modules()}
    with eval_mode(model), torch.enable_grad():
        z, tape = forward(model, x.detach().float(), True)
        if tape is None:
            raise ValueError("a recorded layer output was modified in place or a layer ran twice: no per-layer profile")
        z64 = z.detach().double()
        y = basics.predicted(z64)
        cot, scale = normalise(basics.log_odds_cotangent(z64, y)[None])  # (1, N, K), (1, N)
        grads = list(torch.autograd.grad(z, [st.o for st in tape.sites], cot[0]))
    sc = scale[0] ** 2  # (N,)
    param = torch.stack([persample.layer_products(st, [g], None)[0][:, 0] for st, g in zip(tape.sites, grads, strict=True)], 1)
    feature = torch.stack([persample.sq_norm(g.double()) for g in grads], 1)
    return Profile(param.detach().double() * sc[:, None], feature.detach() * sc[:, None], [names[id(st.module)] for st in tape.sites])
