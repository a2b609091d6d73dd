"""Published clean-data detectors, run side by side with the Fisher scores (design.md §7).

- Mahalanobis (Lee et al. 2018): class-conditional Gaussians with a tied covariance on the
  penultimate features, fitted on clean training images; score = min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c).
- Feature squeezing (Xu et al. 2018): max over squeezers of ‖p(x) − p(squeeze(x))‖₁, with bit-depth
  reduction and a 2×2 median filter. Needs no fitting at all.
Both are "larger = more unusual".
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.fisher import SCORES, ScoreSpec

SPECS: dict[str, ScoreSpec] = {"mahalanobis": ScoreSpec("high", False), "feature_squeezing": ScoreSpec("high", False)}
KNOWN: dict[str, ScoreSpec] = SCORES | SPECS  # every score a calibration may hold


def penultimate(model: nn.Module, x: Tensor, grad: bool = False) -> Tensor:
    """The input of the model's last nn.Linear: the penultimate features. -> (N, F).
    grad=True keeps them differentiable in x (for an adaptive attacker)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats: list[Tensor] = []
    handle = last.register_forward_hook(lambda mod, args, out: feats.append(args[0]))
    try:
        with torch.set_grad_enabled(grad):
            model(x)
    finally:
        handle.remove()
    return feats[0].flatten(1) if grad else feats[0].detach().flatten(1)


@dataclass
class Mahalanobis:
    means: Tensor  # (K, F)
    precision: Tensor  # (F, F)

    @classmethod
    def fit(cls, model: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> "Mahalanobis":
        f = torch.cat([penultimate(model, x[i : i + batch]) for i in range(0, len(x), batch)]).double()  # (N, F)
        classes = torch.unique(y)  # classes without images get no Gaussian
        means = torch.stack([f[y == c].mean(0) for c in classes])  # (K', F)
        centred = f - means[torch.searchsorted(classes, y)]
        cov = centred.T @ centred / len(f)  # tied covariance (F, F)
        ridge = 1e-3 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)  # dead units have no variance
        return cls(means, torch.linalg.inv(cov + ridge))

    def distance(self, f: Tensor) -> Tensor:
        """min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c) of penultimate features f (N, F), float64 -> (N,)."""
        d = f.double()[:, None, :] - self.means.to(f.device)[None]  # (N, K, F)
        return torch.einsum("nkf,fg,nkg->nk", d, self.precision.to(f.device), d).min(1).values  # (N,)

    def score(self, model: nn.Module, x: Tensor, grad: bool = False) -> Tensor:
        return self.distance(penultimate(model, x, grad))

    def save(self, path: Path, weights_sha256: str) -> None:
        """safetensors, tied to the model weights it was fitted for."""
        from safetensors.torch import save_file

        save_file(
            {"means": self.means.contiguous(), "precision": self.precision.contiguous()}, str(path), {"weights_sha256": weights_sha256}
        )

    @classmethod
    def load(cls, path: Path) -> tuple["Mahalanobis", str]:
        """The fit and the weights sha256 it was made for."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            return cls(f.get_tensor("means"), f.get_tensor("precision")), meta.get("weights_sha256", "")


def _bit_depth(x: Tensor, bits: int) -> Tensor:
    levels = 2**bits - 1
    return (x * levels).round() / levels


def _median_2x2(x: Tensor) -> Tensor:
    """2×2 median filter (the lower median of the window), same size output. (N, C, H, W)."""
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    windows = padded.unfold(2, 2, 1).unfold(3, 2, 1).flatten(-2)  # (N, C, H, W, 4)
    return windows.median(-1).values


def feature_squeezing(model: nn.Module, x: Tensor, grad: bool = False) -> Tensor:
    """max over squeezers of the L1 distance between predictions. -> (N,) float64.
    grad=True keeps it differentiable in x for an adaptive attacker: the bit-depth squeezer then passes
    gradients straight through (BPDA, Athalye et al. 2018); the median filter is differentiable as is."""
    bits = 1 if x.shape[1] == 1 else 5
    squeezed = x + (_bit_depth(x, bits) - x).detach() if grad else _bit_depth(x, bits)
    with torch.set_grad_enabled(grad):
        p = torch.softmax(model(x), 1)
        dists = [(p - torch.softmax(model(sq), 1)).abs().sum(1) for sq in (squeezed, _median_2x2(x))]
    return torch.stack(dists).amax(0).double()


def available(mahalanobis: Mahalanobis | None) -> tuple[str, ...]:
    """The baseline scores a bundle can serve: feature squeezing always, Mahalanobis with its fit."""
    return ("feature_squeezing", "mahalanobis") if mahalanobis is not None else ("feature_squeezing",)


def baseline_scores(model: nn.Module, x: Tensor, names: Sequence[str], mahalanobis: Mahalanobis | None) -> dict[str, Tensor]:
    """The requested baseline scores, float64 (N,), on x's device."""
    out: dict[str, Tensor] = {}
    if "feature_squeezing" in names:
        out["feature_squeezing"] = feature_squeezing(model, x)
    if "mahalanobis" in names:
        if mahalanobis is None:
            raise ValueError("this bundle has no mahalanobis.safetensors: fit one with `fisherguard calibrate --fit-mahalanobis N`")
        out["mahalanobis"] = mahalanobis.score(model, x)
    return out
