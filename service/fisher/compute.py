"""`compute`: every score and heatmap of design.md §3 for a batch of images, in as few passes as
the requested set allows.

One forward records the layers; one (batched) backward of m cotangents at the logits — ∂s/∂z and
e_k − p for the chosen classes — yields both the input gradients (N, C, H, W) and every layer's
output gradients, from which the per-sample parameter Gram (N, m, m) follows by the per-layer
identities of `persample`. `fis` needs one double backward; `fisher_noise_kl` M forwards.
"""

import hashlib
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from service.fisher import basics, functional, persample
from service.fisher.spectral import lanczos_top, top_eigenpair_from_rows

LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class ScoreSpec:
    """How a score is read: `high` when larger is more unusual; `log` when thresholded as log10."""

    direction: Literal["high", "low"]
    log: bool


SCORES: dict[str, ScoreSpec] = {
    "confidence": ScoreSpec("low", False),
    "entropy": ScoreSpec("high", False),
    "margin": ScoreSpec("low", False),
    "sensitivity": ScoreSpec("high", True),
    "fisher_input_binary": ScoreSpec("high", True),
    "fisher_input_trace": ScoreSpec("high", True),
    "fisher_input_eig": ScoreSpec("high", True),
    "fisher_param_binary": ScoreSpec("high", True),
    "fisher_param_trace": ScoreSpec("high", True),
    "fisher_form": ScoreSpec("high", True),
    "fisher_noise_kl": ScoreSpec("high", True),
}
HEATMAPS: tuple[str, ...] = ("fis", "fisher_diag", "eigvec", "saliency")

_S_INPUT = {"sensitivity", "fisher_input_binary", "saliency"}
_S_PARAM = {"fisher_param_binary"}
_CLASS_INPUT = {"fisher_input_trace", "fisher_input_eig", "fisher_diag", "eigvec"}
_CLASS_PARAM = {"fisher_param_trace", "fisher_form"}
_EIG = {"fisher_input_eig", "eigvec"}


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


def to_log10(name: str, value: Tensor) -> Tensor:
    return value.clamp_min(LOG_FLOOR).log10() if SCORES[name].log else value


@dataclass(frozen=True)
class Options:
    top_classes: int | None = None
    eig_method: Literal["auto", "exact", "lanczos"] = "auto"
    lanczos_steps: int = 30
    noise_sigma: float = 0.1
    noise_samples: int = 16
    chunk_size: int | None = None


def _check_names(scores: Sequence[str], heatmaps: Sequence[str]) -> None:
    bad = [s for s in scores if s not in SCORES]
    if bad:
        raise ValueError(f"unknown score(s) {bad}; known scores: {sorted(SCORES)}")
    bad = [h for h in heatmaps if h not in HEATMAPS]
    if bad:
        raise ValueError(f"unknown heatmap(s) {bad}; known heatmaps: {sorted(HEATMAPS)}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm on running statistics, no dropout) for the block, then as before."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


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
) -> FisherResult:
    """Scores and heatmaps of design.md §3 for images x (N, C, H, W) in [0, 1].

    top_classes: use only the m most probable classes for the class sums (traces, eig, diag, form);
    the mass left out is reported in `neglected_mass`. eig_method: `exact` takes the m×m Gram,
    `lanczos` a matrix-free iteration (one JVP + one VJP per step); `auto` picks Lanczos for m > 64.
    chunk_size bounds memory: images per pass (default from the input size and class count).
    """
    scores, heatmaps = tuple(dict.fromkeys(scores)), tuple(dict.fromkeys(heatmaps))
    _check_names(scores, heatmaps)
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    opts = Options(top_classes, eig_method, lanczos_steps, noise_sigma, noise_samples, chunk_size)
    device = next(model.parameters()).device
    x = x.detach().to(device=device, dtype=torch.float32)
    with _eval_mode(model):
        step = opts.chunk_size or _auto_chunk(model, x, scores, heatmaps, opts)
        parts = [_compute_chunk(model, x[i : i + step], scores, heatmaps, opts) for i in range(0, len(x), step)]
    return _concat(parts)


_NUM_CLASSES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]]" = weakref.WeakKeyDictionary()


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """K, from one forward of one image, remembered per model and input shape."""
    known = _NUM_CLASSES.setdefault(model, {})
    shape = tuple(x.shape[1:])
    if shape not in known:
        with torch.no_grad():
            known[shape] = int(model(x[:1]).shape[1])
    return known[shape]


def _auto_chunk(model: nn.Module, x: Tensor, scores: Sequence[str], heatmaps: Sequence[str], opts: Options) -> int:
    """Images per pass so that the (m, N, D) gradient block stays near 2^26 values (256 MB)."""
    wanted = set(scores) | set(heatmaps)
    if not wanted & (_CLASS_INPUT | _CLASS_PARAM):
        return max(1, (1 << 26) // x[0].numel())
    k = _num_classes(model, x)
    m = 1 + min(k, opts.top_classes or k)
    return max(1, (1 << 26) // (m * x[0].numel()))


def _concat(parts: list[FisherResult]) -> FisherResult:
    first = parts[0]
    return FisherResult(
        probs=torch.cat([r.probs for r in parts]),
        predicted=torch.cat([r.predicted for r in parts]),
        scores={k: torch.cat([r.scores[k] for r in parts]) for k in first.scores},
        heatmaps={k: torch.cat([r.heatmaps[k] for r in parts]) for k in first.heatmaps},
        neglected_mass=torch.cat([r.neglected_mass for r in parts]),
    )


def _forward(model: nn.Module, x: Tensor, want_tape: bool) -> tuple[Tensor, persample.Tape | None]:
    """Logits, and the layer tape when the per-layer identities apply to this model."""
    if not want_tape or not persample.hookable(model):
        return model(x), None
    for protect in (False, True):
        with persample.record(model, protect) as tape:
            z = model(x)
        if tape.intact():
            return z, tape
    return model(x), None


def _compute_chunk(model: nn.Module, x: Tensor, scores: Sequence[str], heatmaps: Sequence[str], opts: Options) -> FisherResult:
    wanted = set(scores) | set(heatmaps)
    need_s = bool(wanted & (_S_INPUT | _S_PARAM))
    need_cls = bool(wanted & (_CLASS_INPUT | _CLASS_PARAM))
    need_x = bool(wanted & (_S_INPUT | _CLASS_INPUT))
    need_theta = bool(wanted & (_S_PARAM | _CLASS_PARAM))
    x = x.requires_grad_(need_x or need_theta)
    with torch.set_grad_enabled(need_x or need_theta):
        z, tape = _forward(model, x, need_theta)
    z64 = z.detach().double()
    log_p = torch.log_softmax(z64, dim=1)  # (N, K)
    p = log_p.exp()
    y = basics.predicted(z64)
    s = basics.log_odds(z64, y)  # (N,)
    out = FisherResult(probs=p.float(), predicted=y, neglected_mass=torch.zeros(len(x), dtype=torch.float64))
    if "confidence" in wanted:
        out.scores["confidence"] = p.gather(1, y[:, None]).squeeze(1)
    if "entropy" in wanted:
        out.scores["entropy"] = basics.entropy(log_p)
    if "margin" in wanted:
        out.scores["margin"] = s
    if need_s or need_cls:
        _gradient_scores(model, x, z, z64, tape, p, y, s, wanted, need_s, need_cls, need_x, need_theta, opts, out)
    if "fis" in wanted:
        out.heatmaps["fis"] = fis(model, x, y)
    if "fisher_noise_kl" in wanted:
        out.scores["fisher_noise_kl"] = noise_kl(model, x, log_p, opts.noise_sigma, opts.noise_samples)
    out.scores = {k: out.scores[k].detach() for k in scores}
    out.heatmaps = {k: out.heatmaps[k].detach().float() for k in heatmaps}
    return out


def _cotangents(z64: Tensor, p: Tensor, y: Tensor, classes: Tensor | None, need_s: bool) -> Tensor:
    """Rows of ∂(·)/∂z: ∂s/∂z, then e_k − p for each chosen class, with 1 − p_k formed stably."""
    rows = [basics.log_odds_cotangent(z64, y)[None]] if need_s else []
    if classes is not None:
        cot = basics.class_cotangents(p, classes)  # (m, N, K)
        others = z64[None].expand(classes.shape[1], -1, -1).scatter(2, classes.T[:, :, None], float("-inf"))
        one_minus = (torch.logsumexp(others, 2) - torch.logsumexp(z64, 1)[None]).exp()  # (m, N) = 1 − p_k
        rows.append(cot.scatter(2, classes.T[:, :, None], one_minus[:, :, None]))
    return torch.cat(rows)  # (m, N, K) float64


def _normalise(cot: Tensor) -> tuple[Tensor, Tensor]:
    """Rows scaled to max-norm 1 for the float32 backward (a cotangent of size 1 − p̂ ≈ e^-70 would
    underflow once squared); gradients are linear in the cotangent, so scale them back in float64."""
    scale = cot.abs().amax(2).clamp_min(1e-300)  # (m, N)
    return (cot / scale[:, :, None]).float(), scale


def _backward(z: Tensor, inputs: list[Tensor], cot: Tensor) -> list[list[Tensor]]:
    """VJPs of m cotangents (m, N, K) to each input: out[j][i] has input i's shape. Small batches
    vmap over the cotangents (one batched backward); larger ones loop, which is faster there."""
    if cot.shape[0] > 1 and z.shape[0] < 4:
        batched = torch.autograd.grad(z, inputs, cot, retain_graph=True, is_grads_batched=True)
        return [[g[j] for g in batched] for j in range(cot.shape[0])]
    return [list(torch.autograd.grad(z, inputs, c, retain_graph=True)) for c in cot]


def _gradient_scores(
    model: nn.Module,
    x: Tensor,
    z: Tensor,
    z64: Tensor,
    tape: persample.Tape | None,
    p: Tensor,
    y: Tensor,
    s: Tensor,
    wanted: set[str],
    need_s: bool,
    need_cls: bool,
    need_x: bool,
    need_theta: bool,
    opts: Options,
    out: FisherResult,
) -> None:
    classes = basics.top_classes(p, opts.top_classes) if need_cls else None
    if classes is not None:
        out.neglected_mass = (1.0 - p.gather(1, classes).sum(1)).clamp_min(0.0)
    cot, scale = _normalise(_cotangents(z64, p, y, classes, need_s))  # (m, N, K), (m, N)
    use_lanczos = bool(wanted & _EIG) and (
        opts.eig_method == "lanczos" or (opts.eig_method == "auto" and classes is not None and classes.shape[1] > 64)
    )
    inputs = ([x] if need_x else []) + ([st.o for st in tape.sites] if need_theta and tape is not None else [])
    grads = _backward(z, inputs, cot) if inputs else []
    var = basics.bernoulli_variance(s)  # (N,)
    pk = p.gather(1, classes).T if classes is not None else None  # (m, N) probabilities of the chosen classes
    if need_x:
        gx = torch.stack([g.pop(0) for g in grads]).double().flatten(2) * scale[:, :, None]  # (m, N, D)
        _input_scores(model, x, z, p, gx, pk, var, wanted, need_s, use_lanczos, opts, out)
    if need_theta:
        ref = (1 if need_s else 0) if classes is not None else None  # the row of ŷ, for fisher_form
        if tape is not None:
            diag, cross = persample.param_products(tape, grads, ref)
        else:
            gram = functional.param_gram(model, x.detach(), cot)  # (N, m, m)
            diag, cross = gram.diagonal(dim1=1, dim2=2), (gram[:, :, ref] if ref is not None else None)
        sc = scale.T.double()  # (N, m)
        diag = diag.detach().double() * sc * sc
        cross = cross.detach().double() * sc * sc[:, ref : ref + 1] if cross is not None and ref is not None else None
        _param_scores(diag, cross, pk, var, wanted, need_s, out)


def _input_scores(
    model: nn.Module,
    x: Tensor,
    z: Tensor,
    p: Tensor,
    gx: Tensor,
    pk: Tensor | None,
    var: Tensor,
    wanted: set[str],
    need_s: bool,
    use_lanczos: bool,
    opts: Options,
    out: FisherResult,
) -> None:
    """From input gradients gx (m, N, D) float64: row 0 is ∇_x s when need_s, then ∇_x log p_k."""
    n, c, h, w = x.shape
    if need_s:
        gs = gx[0]  # (N, D)
        sens = (gs * gs).sum(1)
        out.scores["sensitivity"] = sens
        out.scores["fisher_input_binary"] = var * sens
        out.heatmaps["saliency"] = (gs * gs).view(n, c, h, w).sum(1)
    if pk is None:
        return
    gk = gx[1:] if need_s else gx  # (m, N, D)
    sq = gk * gk
    out.scores["fisher_input_trace"] = torch.einsum("kn,knd->n", pk, sq)  # Σ_k p_k ‖∇_x log p_k‖²
    out.heatmaps["fisher_diag"] = torch.einsum("kn,knd->nd", pk, sq).view(n, c, h, w).sum(1)
    if not wanted & _EIG:
        return
    if use_lanczos:
        lam, u = lanczos_top(_fisher_matvec(model, x, z, p), gk[0], opts.lanczos_steps)
    else:
        lam, u = top_eigenpair_from_rows(pk.sqrt()[:, :, None] * gk)  # rows √p_k ∇_x log p_k
    out.scores["fisher_input_eig"] = lam
    out.heatmaps["eigvec"] = u.abs().view(n, c, h, w).sum(1)


def _fisher_matvec(model: nn.Module, x: Tensor, z: Tensor, p: Tensor):  # type: ignore[no-untyped-def]
    """v ↦ G_x v = J_xᵀ A J_x v per sample: one JVP and one VJP. (N, D) float64 -> (N, D) float64."""
    xd = x.detach()
    pf = p.float()

    def matvec(v: Tensor) -> Tensor:
        jv = torch.func.jvp(model, (xd,), (v.float().view_as(xd),))[1]  # (N, K)
        av = pf * jv - pf * (pf * jv).sum(1, keepdim=True)  # A J v
        (gv,) = torch.autograd.grad(z, x, av, retain_graph=True)
        return gv.double().flatten(1)

    return matvec


def _param_scores(
    diag: Tensor, cross: Tensor | None, pk: Tensor | None, var: Tensor, wanted: set[str], need_s: bool, out: FisherResult
) -> None:
    """From per-sample ‖∇_θ c_j·z‖² (N, m) and ⟨∇_θ c_j·z, ∇_θ log p̂⟩ (N, m): row 0 is s when need_s,
    then log p_k for the chosen classes (ŷ first)."""
    if need_s:
        out.scores["fisher_param_binary"] = var * diag[:, 0]
    if pk is None or cross is None:
        return
    first = 1 if need_s else 0
    d, c = diag[:, first:], cross[:, first:]  # (N, m)
    out.scores["fisher_param_trace"] = (pk.T * d).sum(1)  # Σ_k p_k ‖∇_θ log p_k‖²
    if "fisher_form" in wanted:
        vv = d[:, 0]  # ‖v‖², v = ∇_θ log p̂
        form = (pk.T * c * c).sum(1)  # vᵀ F v = Σ_k p_k ⟨∇ log p_k, v⟩²
        out.scores["fisher_form"] = torch.where(vv > 0, form / vv.clamp_min(1e-300), torch.zeros_like(vv))


def fis(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Martin & Elster's binary Fisher information sensitivity, exact. (N, C, H, W) -> (N, H, W) float64.

    FIS_i = Σ_j ∂_i(D_v log q_j) ∂_i(D_v q_j), q_0 = p̂, q_1 = 1 − p̂, D_v f = ⟨∇_θ f, v⟩ with
    v = ∇_θ log p̂ held fixed. Since ∇_θ log p̂ = (1 − p̂)∇_θ s, every D_v term is a multiple of
    k = D_v s, and the sum collapses to FIS_i = ∂_i(p̂(1−p̂)k) · ∂_i k. With v = (1 − p̂)w,
    w = ∇_θ s held fixed and k̃ = ⟨∇_θ s(x), w⟩:
        FIS_i = p̂(1 − p̂)³ (∂_i k̃ + (1 − 2p̂) k̃ ∂_i s) ∂_i k̃,
    where nothing cancels and nothing is of size 1 − p̂ until the float64 prefactor.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z, tape = _forward(model, x, True)
        s = basics.log_odds(z, y)  # (N,)
        if tape is not None:
            outs = [st.o for st in tape.sites]
            *gs, ds = torch.autograd.grad(s.sum(), [*outs, x], create_graph=True)  # ∂s/∂o_l, ∂s/∂x
            k = sum(
                (persample.layer_inner(st.module, st.a, g, st.a.detach(), g.detach()) for st, g in zip(tape.sites, gs, strict=True)),
                torch.zeros(()),
            )  # (N,) k̃ = ⟨∇_θ s(x), w⟩
            (dk,) = torch.autograd.grad(k.sum(), x)
            k, ds = k.detach(), ds.detach()
        else:
            dk = functional.directional_grad(model, x.detach(), y)
            k = functional.directional_value(model, x.detach(), y)
            (ds,) = torch.autograd.grad(s.sum(), x)
    s64, k64 = s.detach().double(), k.double()
    log_pre = -torch.nn.functional.softplus(-s64) - 3 * torch.nn.functional.softplus(s64)  # log p̂(1 − p̂)³
    shape = (-1, 1, 1, 1)
    dk, ds = dk.double(), ds.double()
    return (log_pre.exp().view(shape) * (dk + ((1 - 2 * torch.sigmoid(s64)) * k64).view(shape) * ds) * dk).sum(1)


def _image_seed(x1: Tensor) -> int:
    """A seed from the image's float32 bytes: the same image always draws the same noise."""
    return int.from_bytes(hashlib.sha256(x1.detach().float().cpu().numpy().tobytes()).digest()[:8], "little")


@torch.no_grad()
def noise_kl(model: nn.Module, x: Tensor, log_p: Tensor, sigma: float, samples: int) -> Tensor:
    """(1/M) Σ_m KL(p(x) ‖ p(clip₀¹(x + σ η_m))), η_m ~ N(0, I) seeded per image. -> (N,) float64."""
    noise = torch.stack([torch.randn((samples, *x.shape[1:]), generator=torch.Generator().manual_seed(_image_seed(x1))) for x1 in x]).to(
        x.device
    )  # (N, M, C, H, W)
    xs = (x.detach()[:, None] + sigma * noise).clamp(0.0, 1.0).flatten(0, 1)  # (N·M, C, H, W)
    log_q = torch.log_softmax(model(xs).double(), dim=1).view(len(x), samples, -1)  # (N, M, K)
    return (log_p.exp()[:, None] * (log_p[:, None] - log_q)).sum(2).mean(1)


def input_fisher_top_eigenpair(model: nn.Module, x: Tensor, top_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """λ_max(G_x) (N,) float64 and the signed unit top eigenvector u₁ (N, C, H, W) float32: the
    direction of OSSA (Zhao et al.). Exact from the m×m Gram of the rows √p_k ∇_x log p_k."""
    with _eval_mode(model):
        x = x.detach().to(dtype=torch.float32).requires_grad_(True)
        with torch.enable_grad():
            z = model(x)
        z64 = z.detach().double()
        p = torch.softmax(z64, 1)
        classes = basics.top_classes(p, top_classes)
        cot, scale = _normalise(_cotangents(z64, p, basics.predicted(z64), classes, need_s=False))
        gx = torch.stack([g[0] for g in _backward(z, [x], cot)]).double().flatten(2) * scale[:, :, None]  # (m, N, D)
        lam, u = top_eigenpair_from_rows(p.gather(1, classes).T.sqrt()[:, :, None] * gx)
    return lam, u.float().view_as(x)
