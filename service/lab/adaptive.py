"""An attacker who knows the whole decision (docs/detection.md#adaptive-attacks): differentiable
stand-ins for each of its scores, a penalty that keeps every one of them inside its clean range, and
selective PGD through them.

For a decision with components j (score s_j, tail), the clean calibration values v_j give a centre
m_j = median(v_j) and the α = 0.05 boundaries q_j^lo, q_j^hi (the 2.5%/97.5% quantiles for a
two-sided tail, the 95% (or 5%) quantile for a one-sided one). With z_j the distance from m_j in units
of the distance to the boundary on that side,

    penalty(x) = max_j relu(z_j(x) − margin),   z_j = (s_j(x) − m_j)/(q_j^hi − m_j) above m_j, (m_j − s_j(x))/(m_j − q_j^lo) below,

counting only the tails the decision tests: zero while every score sits well inside its clean range,
else the excess of the most unusual component, the one that decides a combined decision's minimum
p-value (steps then go where the flag is decided, and no component's scale swamps the others).
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.core.baselines import Mahalanobis, feature_squeezing, forward_scores
from service.core.calibration import Component
from service.core.features import extract
from service.core.learned import LearnedDetector
from service.core.scores import SCORES
from service.fisher import functional
from service.fisher.basics import entropy, log_odds, predicted
from service.fisher.noise import neighbourhood_kl
from service.fisher.plan import Options as FisherOptions
from service.fisher.scores import to_log10
from service.lab.attacks import l2_norm
from service.lab.attacks import margin as margin_of

Surrogate = Callable[[nn.Module, Tensor], Tensor]  # differentiable score in its thresholded form, (N,)
Penalty = Callable[[nn.Module, Tensor], Tensor]  # (N,) ≥ 0


def log10_input_trace(model: nn.Module, x: Tensor) -> Tensor:
    """log10 tr G_x = log10 Σ_k p_k ‖∇_x log p_k‖², differentiable in x (K double backward passes). -> (N,)."""
    log_p = torch.log_softmax(model(x), 1)  # (N, K)
    total = torch.zeros(len(x), device=x.device)
    for k in range(log_p.shape[1]):
        (g,) = torch.autograd.grad(log_p[:, k].sum(), x, create_graph=True)
        total = total + log_p[:, k].exp() * g.flatten(1).pow(2).sum(1)
    return total.clamp_min(1e-30).log10()


def log10_param_trace(model: nn.Module, x: Tensor) -> Tensor:
    """log10 tr F_θ = log10 tr(A·J_θJ_θᵀ), A = diag(p) − ppᵀ (N, K, K) and J_θJ_θᵀ the per-sample Gram
    of the logit gradients (torch.func: K vector-Jacobian products per image), differentiable in x. -> (N,)."""
    p = torch.softmax(model(x).double(), 1)  # (N, K); float64: 1 − p̂ cancels on confident images
    n, k = p.shape
    units = torch.eye(k, device=x.device).expand(n, k, k).transpose(0, 1)  # (K, N, K): e_k per image
    gram = functional.param_gram(model, x, units.to(x.dtype)).double()  # (N, K, K)
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, K, K)
    return (a * gram).sum((1, 2)).clamp_min(1e-30).log10()


def margin(model: nn.Module, x: Tensor) -> Tensor:
    """s = z_ŷ − logsumexp_{k≠ŷ} z_k, differentiable in x. -> (N,)."""
    z = model(x)  # (N, K)
    return log_odds(z, predicted(z))


def log10_sensitivity(model: nn.Module, x: Tensor) -> Tensor:
    """log10 ‖∇_x s‖², differentiable in x (one double backward pass). -> (N,)."""
    (g,) = torch.autograd.grad(margin(model, x).sum(), x, create_graph=True)
    return g.flatten(1).pow(2).sum(1).clamp_min(1e-30).log10()


def noise_kl(sigma: float, samples: int) -> Surrogate:
    """log10 (1/M) Σ_m KL(p(x) ‖ p(clip₀¹(x + σ η_m))), differentiable in x through both sides, η the draw
    the served score takes at this x (seeded by the image: service.fisher.noise). -> (N,) float64."""

    def kl(model: nn.Module, x: Tensor) -> Tensor:
        log_p = torch.log_softmax(model(x).double(), 1)  # (N, K)
        return to_log10("fisher_noise_kl", neighbourhood_kl(model, x, log_p, sigma, samples))

    return kl


def surrogates(
    mahalanobis: Mahalanobis | None,
    detector: LearnedDetector | None = None,
    noise_sigma: float = FisherOptions.noise_sigma,
    noise_samples: int = FisherOptions.noise_samples,
) -> dict[str, Surrogate]:
    """The decision scores an adaptive attacker can differentiate, in the calibration's thresholded form.
    The learned detector's features and `fisher_noise_kl` (σ and M as the calibration scored it) are
    differentiated exactly, through the noise draw their served value takes (seeded by the current image)."""
    table: dict[str, Surrogate] = {
        "confidence": lambda m, x: torch.softmax(m(x), 1).amax(1),
        "entropy": lambda m, x: entropy(torch.log_softmax(m(x), 1)),
        "margin": margin,
        "sensitivity": log10_sensitivity,
        "fisher_input_trace": log10_input_trace,
        "fisher_param_trace": log10_param_trace,
        "feature_squeezing": lambda m, x: feature_squeezing(m, x, grad=True),
        "squeeze_drop": lambda m, x: forward_scores(m, x, ["squeeze_drop"], None, grad=True)[1]["squeeze_drop"],
        "fisher_noise_kl": noise_kl(noise_sigma, noise_samples),
    }
    if mahalanobis is not None:
        table["mahalanobis"] = lambda m, x: mahalanobis.score(m, x, grad=True)
        if mahalanobis.layers:
            table["mahalanobis_layers"] = lambda m, x: mahalanobis.layers_score(m, x, grad=True)
    if detector is not None:
        table["learned"] = lambda m, x: detector.logit(extract(m, x, detector.spec, mahalanobis, grad=True))
        table["fisher_noise_shift"] = lambda m, x: detector.noise_shift(extract(m, x, detector.spec, mahalanobis, grad=True))
    return table


@dataclass(frozen=True)
class Target:
    """One decision component as the attacker sees it."""

    surrogate: Surrogate
    center: float
    low: float  # the clean α-boundaries; ±inf for a tail the decision does not test
    high: float

    def excess(self, t: Tensor) -> Tensor:
        """z(t): 0 at the clean median, 1 at the boundary of a tested tail, 0 toward an untested one."""
        above = (t - self.center) / max(self.high - self.center, 1e-12)
        below = (self.center - t) / max(self.center - self.low, 1e-12)
        return torch.maximum(above, below).clamp_min(0)


def targets(
    values: dict[str, np.ndarray],
    components: Sequence[Component],
    mahalanobis: Mahalanobis | None,
    alpha: float = 0.05,
    detector: LearnedDetector | None = None,
    noise_sigma: float = FisherOptions.noise_sigma,
    noise_samples: int = FisherOptions.noise_samples,
) -> list[Target]:
    """Targets for a decision's components from the clean calibration values (thresholded form)."""
    table = surrogates(mahalanobis, detector, noise_sigma, noise_samples)
    out = []
    for c in components:
        if c.score not in table:
            raise ValueError(f"the adaptive attack cannot differentiate {c.score!r} (it can: {sorted(table)})")
        v = np.asarray(values[c.score])
        direction = SCORES[c.score].direction
        two = c.tail == "two-sided"
        low = float(np.quantile(v, alpha / 2)) if two else (float(np.quantile(v, alpha)) if direction == "low" else -np.inf)
        high = float(np.quantile(v, 1 - alpha / 2)) if two else (float(np.quantile(v, 1 - alpha)) if direction == "high" else np.inf)
        out.append(Target(table[c.score], float(np.median(v)), low, high))
    return out


def decision_penalty(targets: list[Target], margin: float = 0.5) -> Penalty:
    """max_j relu(z_j − margin): see the module docstring."""

    def penalty(model: nn.Module, x: Tensor) -> Tensor:
        z = torch.stack([t.excess(t.surrogate(model, x).double()) for t in targets])  # (J, N)
        return (z.amax(0) - margin).clamp_min(0)

    return penalty


class _SurrogateReLU(torch.autograd.Function):
    """ReLU forward; the derivative of softplus(βx)/β in the backward, so that second derivatives
    (double backprop through a gradient-based score) do not vanish. Composes with torch.func (vmap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, float], output: Tensor) -> None:  # type: ignore[no-untyped-def, override]
        x, ctx.beta = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(ctx.beta * x), None


@contextmanager
def relu_surrogate(beta: float = 10.0) -> Iterator[None]:
    """Inside the block every F.relu / torch.relu / nn.ReLU uses the softplus surrogate backward."""
    saved = F.relu, torch.relu

    def relu(x: Tensor, inplace: bool = False) -> Tensor:
        return _SurrogateReLU.apply(x, beta)  # type: ignore[no-any-return]

    F.relu, torch.relu = relu, relu  # type: ignore[assignment]
    try:
        yield
    finally:
        F.relu, torch.relu = saved  # type: ignore[assignment]


def adaptive_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    penalty: Callable[[nn.Module, Tensor], Tensor],
    kappa: float = 2.0,
    steps: int = 40,
    beta: float = 10.0,
    seed: int = 0,
    norm: str = "linf",
) -> Tensor:
    """An attacker who knows the detector: PGD (L∞ or L2 ball of radius ε, random start) ascending
    −max(m, −κ) − [m < −κ]·penalty(x), m = z_y − max_{k≠y} z_k: misclassify by a margin κ, and
    once that holds step only on the detector, keeping the decision's scores inside their clean range
    (selective PGD, Bryniarski et al. 2022; penalty (N,) ≥ 0, differentiable in x: see
    the targets above), by double backprop with the softplus surrogate for
    ReLU in the backward pass. Returns, per image, the misclassified iterate with the smallest
    penalty (the last iterate where none was misclassified)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm {norm!r} is not 'linf' or 'l2'")
    alpha = 2.5 * eps / steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device)
    adv = (x + start * (eps if norm == "linf" else eps / l2_norm(start))).clamp(0, 1)
    best, best_penalty = adv.clone(), torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
    for _ in range(steps + 1):
        xa = adv.detach().requires_grad_(True)
        with torch.enable_grad(), relu_surrogate(beta):
            m = margin_of(model(xa), y)  # (N,)
            pen = penalty(model, xa)  # (N,)
            better = (m < 0) & (pen.detach() < best_penalty)
            best[better], best_penalty[better] = adv[better], pen.detach()[better]
            done = m < -kappa  # misclassified with margin κ: now only the detector matters (selective PGD)
            (g,) = torch.autograd.grad(-m.clamp(min=-kappa).sum() - (pen * done).sum(), xa)
        if norm == "linf":
            adv = (x + (adv + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1).detach()
        else:
            d = adv + alpha * g / l2_norm(g).clamp_min(1e-12) - x
            adv = (x + d * (eps / l2_norm(d).clamp_min(1e-12)).clamp(max=1.0)).clamp(0, 1).detach()
    return torch.where(torch.isinf(best_penalty).view(-1, 1, 1, 1), adv, best)
