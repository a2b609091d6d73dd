"""The neighbourhood form of the input Fisher (docs/fisher.md#neighbourhood): the mean KL divergence
between the prediction at x and at seeded Gaussian perturbations of x; ≈ ½σ² tr G_x for small σ."""

import hashlib

import torch
from torch import Tensor, nn


def image_seed(x1: Tensor) -> int:
    """A seed from the image's float32 bytes: the same image always draws the same noise."""
    return int.from_bytes(hashlib.sha256(x1.detach().float().cpu().numpy().tobytes()).digest()[:8], "little")


def seeded_noise(x: Tensor, samples: int) -> Tensor:
    """η ~ N(0, I) per image, seeded by the image. (N, C, H, W) -> (N, M, C, H, W) on x's device."""
    draws = [torch.randn((samples, *x.shape[1:]), generator=torch.Generator().manual_seed(image_seed(x1))) for x1 in x]
    return torch.stack(draws).to(x.device)


def neighbourhood_kl(model: nn.Module, x: Tensor, log_p: Tensor, sigma: float, samples: int) -> Tensor:
    """(1/M) Σ_m KL(p(x) ‖ p(clip₀¹(x + σ η_m))), differentiable in x and log_p (the draws η are not).
    x (N, C, H, W), log_p (N, K) float64 -> (N,) float64."""
    xs = (x[:, None] + sigma * seeded_noise(x, samples)).clamp(0.0, 1.0).flatten(0, 1)  # (N·M, C, H, W)
    log_q = torch.log_softmax(model(xs).double(), dim=1).view(len(x), samples, -1)  # (N, M, K)
    return (log_p.exp()[:, None] * (log_p[:, None] - log_q)).sum(2).mean(1)


@torch.no_grad()
def noise_kl(model: nn.Module, x: Tensor, log_p: Tensor, sigma: float, samples: int) -> Tensor:
    """The served `fisher_noise_kl`: neighbourhood_kl without gradients. -> (N,) float64."""
    return neighbourhood_kl(model, x.detach(), log_p, sigma, samples)


@torch.no_grad()
def noise_response(model: nn.Module, x: Tensor, z: Tensor, sigma: float, samples: int) -> dict[str, Tensor]:
    """How the prediction at x responds to M seeded Gaussian perturbations x + σ η_m (clipped to [0, 1]):

    - `shift` (N, K): the mean change of every logit difference, E_m[(z_k − z_ŷ)(x + σ η_m)] − (z_k − z_ŷ)(x)
      (Roth et al. 2019: near an adversarial image the true class gains);
    - `flip` (N,): the share of draws whose prediction is not ŷ;
    - `kl` (N,): the mean KL(p(x) ‖ p(x + σ η_m)), ≈ ½σ² tr G_x for small σ.

    x (N, C, H, W), z (N, K) its logits. float64 results."""
    n = len(x)
    xs = (x.detach()[:, None] + sigma * seeded_noise(x, samples)).clamp(0.0, 1.0).flatten(0, 1)  # (N·M, C, H, W)
    zq = model(xs).double().view(n, samples, -1)  # (N, M, K)
    z64 = z.detach().double()
    y = z64.argmax(1)
    diff = lambda t: t - t.gather(-1, y.view(n, *([1] * (t.dim() - 1))).expand(*t.shape[:-1], 1))  # noqa: E731  z_k − z_ŷ
    log_p, log_q = torch.log_softmax(z64, 1), torch.log_softmax(zq, 2)
    return {
        "shift": diff(zq).mean(1) - diff(z64),
        "flip": (zq.argmax(2) != y[:, None]).double().mean(1),
        "kl": (log_p.exp()[:, None] * (log_p[:, None] - log_q)).sum(2).mean(1),
    }
