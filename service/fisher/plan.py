"""What one call of `compute` must do: the caller's options, and the passes its names need."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

FORWARD = frozenset({"confidence", "entropy", "margin"})  # from the logits alone
S_INPUT = frozenset({"sensitivity", "fisher_input_binary", "saliency"})  # need ∇_x s
S_PARAM = frozenset({"fisher_param_binary"})  # need ‖∇_θ s‖²
CLASS_INPUT = frozenset({"fisher_input_trace", "fisher_input_eig", "fisher_diag", "eigvec"})  # need ∇_x log p_k
CLASS_PARAM = frozenset({"fisher_param_trace", "fisher_form"})  # need ⟨∇_θ log p_j, ∇_θ log p_k⟩
EIG = frozenset({"fisher_input_eig", "eigvec"})


@dataclass(frozen=True)
class Options:
    """The caller's knobs (calibration.json's `score_options` holds the ones a bundle was calibrated with).

    top_classes: use only the m most probable classes in the class sums; eig_method: `exact` (m×m Gram),
    `lanczos` (matrix-free) or `auto` (Lanczos for m > 64); noise_*: the noise KL's σ and draws;
    chunk_size: images per pass (default from the input size and class count); conv_ghost: allow the
    ghost-norm products for convolutions on small maps (off only to measure what they buy)."""

    top_classes: int | None = None
    eig_method: Literal["auto", "exact", "lanczos"] = "auto"
    lanczos_steps: int = 30
    noise_sigma: float = 0.1
    noise_samples: int = 16
    chunk_size: int | None = None
    conv_ghost: bool = True


@dataclass(frozen=True)
class Plan:
    """The passes a set of requested names needs: ∂s/∂z and/or e_k − p cotangents, to x and/or θ."""

    wanted: frozenset[str]
    need_s: bool  # the cotangent ∂s/∂z (row 0 when present)
    need_classes: bool  # the cotangents e_k − p of the chosen classes
    need_x: bool  # gradients to the input
    need_theta: bool  # per-sample parameter-gradient products
    eig: bool  # the top eigenpair of G_x

    @classmethod
    def of(cls, scores: Sequence[str], heatmaps: Sequence[str]) -> "Plan":
        wanted = frozenset(scores) | frozenset(heatmaps)
        return cls(
            wanted=wanted,
            need_s=bool(wanted & (S_INPUT | S_PARAM)),
            need_classes=bool(wanted & (CLASS_INPUT | CLASS_PARAM)),
            need_x=bool(wanted & (S_INPUT | CLASS_INPUT)),
            need_theta=bool(wanted & (S_PARAM | CLASS_PARAM)),
            eig=bool(wanted & EIG),
        )

    @property
    def backward(self) -> bool:
        return self.need_x or self.need_theta

    def lanczos(self, opts: Options, classes: int) -> bool:
        """Lanczos for λ_max when asked, or automatically when more than 64 classes are summed."""
        return self.eig and (opts.eig_method == "lanczos" or (opts.eig_method == "auto" and classes > 64))
