"""The learned detector's features (docs/detection.md#learned-detector): everything one image's
neighbourhood says about it, from one recorded forward and one backward of the image, and one forward
of its copies.

- predictive: the log-odds s of ŷ and the entropy;
- the local input Fisher: log10 ‖∇_x s‖²;
- the layer-wise Fisher profile (service.fisher.profile): log10 of the totals Σ_l ‖∇_{θ_l} s‖² and
  Σ_l ‖∇_{o_l} s‖², and each layer's log10 share of them;
- the neighbourhood Fisher (Roth et al. 2019): for antithetic draws x ± σ η_j, the mean shift of every
  logit difference z_k − z_ŷ — the first-order terms cancel in each pair, leaving ½σ² of its Laplacian —
  and log10 of the mean KL(p(x) ‖ p(x ± σ η_j)) ≈ ½σ² tr G_x;
- squeezing responses (Xu et al.'s squeezers, one column each): log10 KL(p(x) ‖ p(T x)), the drop of
  log p_ŷ under T, and the cosine between ∇_x s and what T removes, x − T x: the first-order part of the
  drop, high when the image's fine detail points up the predicted class's gradient; and log10 of the
  mean square of that residual, mean((x − T x)²): how much fine detail the image has at all, against
  which a detector reads the responses (noise moves the responses as an attack does, but with a
  residual many times larger);
- Mahalanobis distances (log10) when the bundle has a fit.

Every column is differentiable in x (grad=True: double backprop through the profile, straight-through
bit depth), so an adaptive attacker can take exact gradients of a detector built on them.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from service.core.baselines import Mahalanobis, feature_hooks, squeeze_bits, squeeze_drop, squeezing_distance
from service.core.transforms import bit_depth, gaussian_blur, median_2x2
from service.fisher import basics, persample
from service.fisher.gradients import eval_mode, forward
from service.fisher.noise import seeded_noise


def _straight_through(x: Tensor, fx: Tensor, grad: bool) -> Tensor:
    return x + (fx - x).detach() if grad else fx


VERSION = 3  # of the columns' definitions: caches of features from another version are stale

SQUEEZERS: dict[str, Callable[[Tensor, bool], Tensor]] = {
    "bits1": lambda x, g: _straight_through(x, bit_depth(x, 1), g),
    "bits4": lambda x, g: _straight_through(x, bit_depth(x, 4), g),
    "bits5": lambda x, g: _straight_through(x, bit_depth(x, 5), g),
    "median2": lambda x, g: median_2x2(x),
    "blur05": lambda x, g: gaussian_blur(x, 0.5),
    "blur1": lambda x, g: gaussian_blur(x, 1.0),
}


GROUPS = {  # the detector's columns by what they measure, keyed by the name before any "/"
    "predictive": ("margin", "entropy"),
    "fisher": ("log_sensitivity", "log_param_total", "log_feature_total", "param_share", "feature_share", "noise_kl", "noise_shift"),
    "squeezing": ("squeeze_kl", "squeeze_drop", "align", "residual"),
    "mahalanobis": ("log_mahalanobis", "log_mahalanobis_layers"),
}


def group(column: str) -> str:
    """The group of a detector column (GROUPS): `param_share/conv1` -> `fisher`."""
    head = column.split("/")[0]
    found = [g for g, heads in GROUPS.items() if head in heads]
    if not found:
        raise ValueError(f"column {column!r} belongs to no group of {sorted(GROUPS)}")
    return found[0]


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute: the noise scale σ and the number of draws (antithetic pairs: even), the squeezers."""

    sigma: float
    draws: int
    squeezers: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.draws < 2 or self.draws % 2:
            raise ValueError(f"draws must be an even number ≥ 2 (antithetic pairs), got {self.draws}")
        unknown = [s for s in self.squeezers if s not in SQUEEZERS]
        if unknown:
            raise ValueError(f"unknown squeezers {unknown}; known: {sorted(SQUEEZERS)}")


@dataclass
class RawFeatures:
    """One batch: logits (N, K), ŷ (N,), named columns (N,) each, the raw noise shifts (N, K), the
    logits of each squeezed copy (N, K), by squeezer, and the Mahalanobis scores (N,) the columns
    were taken from, by their served names."""

    logits: Tensor
    predicted: Tensor
    columns: dict[str, Tensor]
    shift: Tensor
    squeezed: dict[str, Tensor] = field(default_factory=dict)
    distances: dict[str, Tensor] = field(default_factory=dict)


def _log10(v: Tensor) -> Tensor:
    return v.clamp_min(1e-30).log10()


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) from log-probabilities (..., K) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def extract(
    model: nn.Module, x: Tensor, spec: FeatureSpec, mahalanobis: Mahalanobis | None, grad: bool = False, eta: Tensor | None = None
) -> RawFeatures:
    """The features of images x (N, C, H, W) in [0, 1]. grad=True keeps them differentiable in x. The
    noise draws are seeded by each image's bytes (the same image, the same value); eta (N, M/2, C, H, W)
    fixes them instead, e.g. for an attacker who differentiates through a fixed draw."""
    if not persample.hookable(model):
        raise ValueError("the learned detector's profile needs a model whose parametrised layers are Linear, Conv2d or BatchNorm")
    names = {id(m): n for n, m in model.named_modules()}
    taps = mahalanobis.taps(["mahalanobis_layers"]) if mahalanobis is not None and mahalanobis.layers else []
    n = len(x)
    with eval_mode(model), torch.enable_grad():
        xr = x if grad and x.requires_grad else x.detach().to(next(model.parameters()).dtype).requires_grad_(True)
        kept: dict[str, Tensor] = {}
        hooks = feature_hooks(model, taps, kept)
        try:
            z, tape = forward(model, xr, True)
        finally:
            for h in hooks:
                h.remove()
        if tape is None:
            raise ValueError("a recorded layer output was modified in place or a layer ran twice: no per-layer profile")
        y = basics.predicted(z.detach())
        s = basics.log_odds(z, y)  # (N,)
        gx, *gs = torch.autograd.grad(s.sum(), [xr, *(st.o for st in tape.sites)], create_graph=grad)
        param = torch.stack([persample.layer_products(st, [g], None)[0][:, 0] for st, g in zip(tape.sites, gs, strict=True)], 1)  # (N, L)
        feature = torch.stack([persample.sq_norm(g) for g in gs], 1)  # (N, L)
        copies = [SQUEEZERS[q](xr, grad) for q in spec.squeezers]
        eta = seeded_noise(x.detach(), spec.draws // 2) if eta is None else eta.to(xr)  # (N, M/2, C, H, W)
        noisy = [(xr + sign * spec.sigma * eta[:, j]).clamp(0, 1) for j in range(spec.draws // 2) for sign in (1.0, -1.0)]
        with torch.set_grad_enabled(grad):
            # one forward per copy, not one of the (T + M)·N images: the batch's own size runs faster per
            # image on the CPU (bench/results/decision-cost-cpu.json measures the whole decision)
            zc = torch.stack([model(c) for c in (*copies, *noisy)])  # (T + M, N, K)
    if not grad:
        z, param, feature, gx, zc = z.detach(), param.detach(), feature.detach(), gx.detach(), zc.detach()
        kept = {k: v.detach() for k, v in kept.items()}
    z64, zc64 = z.double(), zc.double()
    log_p, log_q = torch.log_softmax(z64, 1), torch.log_softmax(zc64, 2)  # (N, K), (T + M, N, K)
    cols: dict[str, Tensor] = {
        "margin": basics.log_odds(z64, y),
        "entropy": basics.entropy(log_p),
        "log_sensitivity": _log10(persample.sq_norm(gx.double())),
    }
    param, feature = param.double(), feature.double()
    cols["log_param_total"], cols["log_feature_total"] = _log10(param.sum(1)), _log10(feature.sum(1))
    layers = [names[id(st.module)] for st in tape.sites]
    for i, layer in enumerate(layers):
        cols[f"param_share/{layer}"] = _log10(param[:, i] / param.sum(1).clamp_min(1e-300))
        cols[f"feature_share/{layer}"] = _log10(feature[:, i] / feature.sum(1).clamp_min(1e-300))
    t = len(copies)
    g = gx.double().flatten(1)  # (N, D) ∇_x s
    for i, q in enumerate(spec.squeezers):
        cols[f"squeeze_kl/{q}"] = _log10(_kl(log_p, log_q[i]))
        cols[f"squeeze_drop/{q}"] = squeeze_drop(z64, zc64[i])  # the served score's formula, for every squeezer
        r = (xr - copies[i]).double().flatten(1)  # (N, D) what the squeezer removes
        r = r if grad else r.detach()
        cols[f"residual/{q}"] = _log10((r * r).mean(1))
        cols[f"align/{q}"] = (g * r).sum(1) / (g.norm(dim=1) * r.norm(dim=1)).clamp_min(1e-30)
    cols["noise_kl"] = _log10(_kl(log_p[None], log_q[t:]).mean(0))
    diff = zc64[t:] - zc64[t:].gather(2, y[None, :, None].expand(len(noisy), n, 1))  # (M, N, K): z_k − z_ŷ at each draw
    shift = diff.mean(0) - (z64 - z64.gather(1, y[:, None]))  # (N, K)
    distances: dict[str, Tensor] = {}
    if mahalanobis is not None:
        f = {k: v.double() for k, v in kept.items()}
        distances = mahalanobis.from_features(f, ["mahalanobis", "mahalanobis_layers"] if taps else ["mahalanobis"])
        cols["log_mahalanobis"] = _log10(distances["mahalanobis"])
        if taps:
            cols["log_mahalanobis_layers"] = _log10(distances["mahalanobis_layers"])
    return RawFeatures(z, y, cols, shift, {q: zc[i] for i, q in enumerate(spec.squeezers)}, distances)


def squeezing_from_features(raw: RawFeatures, spec: FeatureSpec, names: Sequence[str], channels: int) -> dict[str, Tensor]:
    """The squeezing scores among `names` (service.core.baselines: `feature_squeezing`, `squeeze_drop`)
    that the copies `extract` already ran can give: feature squeezing when the detector's squeezers
    include both of its copies (bit depth, 2×2 median), the squeeze drop when
    they include the bit-depth one. name -> (N,) float64."""
    bits = f"bits{squeeze_bits(channels)}"  # the detector's name for the squeezing scores' bit-depth copy
    out = {}
    if "feature_squeezing" in names and {bits, "median2"} <= set(spec.squeezers):
        out["feature_squeezing"] = squeezing_distance(raw.logits, [raw.squeezed[q] for q in (bits, "median2")])
    if "squeeze_drop" in names and bits in spec.squeezers:
        out["squeeze_drop"] = squeeze_drop(raw.logits, raw.squeezed[bits])
    return out
