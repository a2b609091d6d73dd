"""`compute`: every score and heatmap of docs/fisher.md for a batch of images, in as few passes as
the requested set allows.

One forward records the layers; one (batched) backward of m cotangents at the logits — ∂s/∂z and
e_k − p for the chosen classes — yields both the input gradients (N, C, H, W) and every layer's
output gradients, from which the per-sample parameter Gram (N, m, m) follows by the per-layer
identities of `persample`. `fis` needs one double backward; `fisher_noise_kl` M forwards.
"""

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from service.fisher import basics, functional, input_fisher, param_fisher, persample
from service.fisher.fis import fis
from service.fisher.gradients import cotangents, eval_mode, forward, normalise, vjps
from service.fisher.noise import noise_kl
from service.fisher.plan import CLASS_INPUT, CLASS_PARAM, Options, Plan
from service.fisher.scores import HEATMAPS, check_names, to_log10


@dataclass
class FisherResult:
    """probs (N, K); predicted (N,); scores name -> (N,) float64 raw values; heatmaps name -> (N, H, W);
    neglected_mass (N,) float64: probability mass of the classes left out by a top-m truncation."""

    probs: Tensor
    predicted: Tensor
    scores: dict[str, Tensor] = field(default_factory=dict)
    heatmaps: dict[str, Tensor] = field(default_factory=dict)
    neglected_mass: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def log10(self, name: str) -> Tensor:
        """The score as thresholded: log10(max(value, 1e-30)) for Fisher scores, raw otherwise."""
        return to_log10(name, self.scores[name])


def compute(
    model: nn.Module,
    x: Tensor,
    scores: Sequence[str] = ("sensitivity",),
    heatmaps: Sequence[str] = (),
    *,
    top_classes: int | None = None,
    eig_method: Literal["auto", "exact", "lanczos"] = "auto",
    lanczos_steps: int = 30,
    noise_sigma: float = 0.1,
    noise_samples: int = 16,
    chunk_size: int | None = None,
    conv_ghost: bool = True,
) -> FisherResult:
    """Scores and heatmaps of docs/fisher.md for images x (N, C, H, W) in [0, 1]; see `Options`."""
    scores, heatmaps = tuple(dict.fromkeys(scores)), tuple(dict.fromkeys(heatmaps))
    check_names(scores, heatmaps)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    opts = Options(top_classes, eig_method, lanczos_steps, noise_sigma, noise_samples, chunk_size, conv_ghost)
    plan = Plan.of(scores, heatmaps)
    device = next(model.parameters()).device
    x = x.detach().to(device=device, dtype=torch.float32)
    with eval_mode(model):
        step = opts.chunk_size or _auto_chunk(model, x, plan, opts)
        parts = [_chunk(model, x[i : i + step], plan, opts) for i in range(0, len(x), step)]
    out = _concat(parts)
    out.scores = {k: out.scores[k] for k in scores}
    out.heatmaps = {k: out.heatmaps[k] for k in heatmaps}
    return out


_PROBED: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], tuple[int, int]]]" = weakref.WeakKeyDictionary()


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """K, from one forward of one image, remembered per model and input shape."""
    return _probe(model, x)[0]


def _activations(model: nn.Module, x: Tensor) -> int:
    """Values the layers output for one image (every leaf module's output), remembered likewise."""
    return _probe(model, x)[1]


def _probe(model: nn.Module, x: Tensor) -> tuple[int, int]:
    known = _PROBED.setdefault(model, {})
    shape = tuple(x.shape[1:])
    if shape not in known:
        count = [0]

        def hook(_m: nn.Module, _i: object, out: object) -> None:
            count[0] += out.numel() if isinstance(out, Tensor) else 0

        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                k = int(model(x[:1]).shape[1])
        finally:
            for h in handles:
                h.remove()
        known[shape] = (k, max(count[0], 1))
    return known[shape]


def _auto_chunk(model: nn.Module, x: Tensor, plan: Plan, opts: Options) -> int:
    """Images per pass so that the (m, N, D) input-gradient block stays near 2^26 values (256 MB)
    and the m cotangent rows' backward through the layers' outputs (m × N × A values, A the
    activations of one image) near 2^28 (1 GB): at 224×224 the activations dominate (ResNet-50:
    A ≈ 2·10^7, so m = 11 rows take one image per pass)."""
    d, a = x[0].numel(), _activations(model, x)
    if not plan.wanted & (CLASS_INPUT | CLASS_PARAM):
        return max(1, min((1 << 26) // d, (1 << 28) // (2 * a)))
    k = _num_classes(model, x)
    m = 1 + min(k, opts.top_classes or k)
    return max(1, min((1 << 26) // (m * d), (1 << 28) // (m * a)))


def _concat(parts: list[FisherResult]) -> FisherResult:
    first = parts[0]
    return FisherResult(
        probs=torch.cat([r.probs for r in parts]),
        predicted=torch.cat([r.predicted for r in parts]),
        scores={k: torch.cat([r.scores[k] for r in parts]) for k in first.scores},
        heatmaps={k: torch.cat([r.heatmaps[k] for r in parts]) for k in first.heatmaps},
        neglected_mass=torch.cat([r.neglected_mass for r in parts]),
    )


def _chunk(model: nn.Module, x: Tensor, plan: Plan, opts: Options) -> FisherResult:
    """Every wanted name for one chunk of images."""
    x = x.requires_grad_(plan.backward)
    with torch.set_grad_enabled(plan.backward):
        z, tape = forward(model, x, plan.need_theta)
    z64 = z.detach().double()
    p, y, values = basics.predictive(z64)  # (N, K), (N,), the forward-only scores
    log_p, s = torch.log_softmax(z64, dim=1), values["margin"]  # (N, K), (N,)
    classes = basics.top_classes(p, opts.top_classes) if plan.need_classes else None
    if plan.backward:
        values |= _gradient_values(model, x, z, z64, tape, p, y, s, classes, plan, opts)
    if "fis" in plan.wanted:
        values["fis"] = fis(model, x, y)
    if "fisher_noise_kl" in plan.wanted:
        values["fisher_noise_kl"] = noise_kl(model, x, log_p, opts.noise_sigma, opts.noise_samples)
    neglected = (1.0 - p.gather(1, classes).sum(1)).clamp_min(0.0) if classes is not None else torch.zeros(len(x), dtype=torch.float64)
    wanted = {k: v.detach() for k, v in values.items() if k in plan.wanted}
    return FisherResult(
        probs=p.float(),
        predicted=y,
        scores={k: v for k, v in wanted.items() if k not in HEATMAPS},
        heatmaps={k: v.float() for k, v in wanted.items() if k in HEATMAPS},
        neglected_mass=neglected,
    )


def _gradient_values(
    model: nn.Module,
    x: Tensor,
    z: Tensor,
    z64: Tensor,
    tape: persample.Tape | None,
    p: Tensor,
    y: Tensor,
    s: Tensor,
    classes: Tensor | None,
    plan: Plan,
    opts: Options,
) -> dict[str, Tensor]:
    """The scores and heatmaps that need the backward of the cotangent rows (∂s/∂z first when
    plan.need_s, then e_k − p for the chosen classes, ŷ first)."""
    cot, scale = normalise(cotangents(z64, p, y, classes, plan.need_s))  # (m, N, K), (m, N)
    layers = [st.o for st in tape.sites] if plan.need_theta and tape is not None else []
    inputs = ([x] if plan.need_x else []) + layers
    grads = vjps(z, inputs, cot) if inputs else []
    var = basics.bernoulli_variance(s)  # (N,) p̂(1 − p̂)
    pk = p.gather(1, classes).T if classes is not None else None  # (m, N) probabilities of the chosen classes
    out: dict[str, Tensor] = {}
    if plan.need_x:
        gx = torch.stack([g[0] for g in grads]).double().flatten(2) * scale[:, :, None]  # (m', N, D)
        out |= _input_values(model, x, z, p, gx, pk, var, plan, opts)
    if plan.need_theta:
        layer_grads = [g[1:] for g in grads] if plan.need_x else grads
        out |= _param_values(model, x, tape, layer_grads, cot, scale, pk, var, plan, opts)
    return out


def _input_values(
    model: nn.Module, x: Tensor, z: Tensor, p: Tensor, gx: Tensor, pk: Tensor | None, var: Tensor, plan: Plan, opts: Options
) -> dict[str, Tensor]:
    """From input gradients gx (m', N, D) float64: row 0 is ∇_x s when plan.need_s, then ∇_x log p_k."""
    shape = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    out = input_fisher.binary(gx[0], var, shape) if plan.need_s else {}
    if pk is None:
        return out
    gk = gx[1:] if plan.need_s else gx  # (m, N, D)
    out |= input_fisher.trace_and_diagonal(gk, pk, shape)
    if plan.eig:
        matvec = input_fisher.matvec(model, x, z, p) if plan.lanczos(opts, pk.shape[0]) else None
        out |= input_fisher.top_eigen(gk, pk, shape, matvec, opts.lanczos_steps)
    return out


def _param_values(
    model: nn.Module,
    x: Tensor,
    tape: persample.Tape | None,
    layer_grads: list[list[Tensor]],
    cot: Tensor,
    scale: Tensor,
    pk: Tensor | None,
    var: Tensor,
    plan: Plan,
    opts: Options,
) -> dict[str, Tensor]:
    """From the per-sample parameter-gradient products of the cotangent rows (same order as `_input_values`)."""
    ref = (1 if plan.need_s else 0) if pk is not None else None  # the row of ŷ, for fisher_form
    if tape is not None:
        diag, cross = persample.param_products(tape, layer_grads, ref, opts.conv_ghost)
    else:
        gram = functional.param_gram(model, x.detach(), cot)  # (N, m, m)
        diag, cross = gram.diagonal(dim1=1, dim2=2), (gram[:, :, ref] if ref is not None else None)
    sc = scale.T.double()  # (N, m)
    diag = diag.detach().double() * sc * sc
    out = param_fisher.binary(diag[:, 0], var) if plan.need_s else {}
    if pk is None or cross is None or ref is None:
        return out
    cross = cross.detach().double() * sc * sc[:, ref : ref + 1]
    first = 1 if plan.need_s else 0
    out |= param_fisher.trace(diag[:, first:], pk)
    if "fisher_form" in plan.wanted:
        out |= param_fisher.form(diag[:, first:], cross[:, first:], pk)
    return out
