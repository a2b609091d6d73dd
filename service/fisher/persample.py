"""Per-sample inner products of parameter gradients without per-sample gradients of the whole model.

For a layer o = f(a; W) applied once per sample, the per-sample weight gradient of a scalar with
output gradient g is linear in g and in a: Linear gives g aᵀ, Conv2d gives Σ_t g_t â_tᵀ over the
unfolded patches â_t, BatchNorm gives Σ_t g_t x̂_t per channel. So for two (a, g) pairs the inner
product ⟨∇_W, ∇_W'⟩ needs no P-sized per-sample tensor for Linear layers on flat inputs
("ghost norm": ⟨g aᵀ, g' a'ᵀ⟩ = (g·g')(a·a')), convolutions on small maps need only the T×T Gram
matrices of their patches and output gradients, and the rest a small per-sample weight-sized tensor. The whole-model inner product is the sum over layers.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Site:
    """One call of a parametrised layer: its input a (N, ...) and output o (N, ...)."""

    module: nn.Module
    a: Tensor
    o: Tensor


@dataclass
class Tape:
    sites: list[Site] = field(default_factory=list)
    versions: list[tuple[int, int]] = field(default_factory=list)

    def modified(self) -> frozenset[int]:
        """The sites whose input or output was modified in place after it was recorded."""
        return frozenset(i for i, (s, v) in enumerate(zip(self.sites, self.versions, strict=True)) if (s.a._version, s.o._version) != v)

    def intact(self) -> bool:
        """No recorded tensor was modified in place after it was recorded, and no layer ran twice."""
        return not self.modified() and len({id(s.module) for s in self.sites}) == len(self.sites)


def _owns_params(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def hookable(model: nn.Module) -> bool:
    """True when every parameter that needs a gradient sits in a supported layer (groups=1 convs)."""
    for m in model.modules():
        if not _owns_params(m):
            continue
        if not isinstance(m, SUPPORTED) or (isinstance(m, nn.Conv2d) and m.groups != 1):
            return False
    return True


@contextmanager
def record(model: nn.Module, protect: frozenset[int] = frozenset()) -> Iterator[Tape]:
    """Records every call of a parametrised layer during the forward passes inside the block.

    The outputs of the calls numbered in `protect` (in call order) are handed on as copies, so that
    in-place operations downstream (ReLU(inplace=True), `out += identity`) cannot overwrite them.
    Only calls on this thread are recorded: a forward of the same model on another thread (a server
    scoring two batches at once) neither enters this tape nor is copied.
    """
    tape = Tape()
    owner = threading.get_ident()

    def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        if threading.get_ident() != owner:
            return out
        copy = len(tape.sites) in protect
        tape.sites.append(Site(mod, args[0], out))
        tape.versions.append((args[0]._version, out._version))
        return out.clone() if copy else out

    hooks = [m.register_forward_hook(hook) for m in model.modules() if _owns_params(m)]
    try:
        yield tape
    finally:
        for h in hooks:
            h.remove()


def _prepare(m: nn.Module, a: Tensor) -> Tensor:
    """What the per-sample gradients need of the layer input, computed once per layer."""
    if isinstance(m, nn.Linear) and a.dim() > 2:
        return a.flatten(1, -2)  # (N, T, I)
    return a  # conv (N, C, H, W); linear (N, I); BatchNorm (N, C, ...): normalised inside `_batchnorm_features`


def sq_norm(v: Tensor) -> Tensor:
    """‖v_n‖² per sample. (N, ...) -> (N,). Off the autograd tape a fused norm: an order of magnitude
    faster on the CPU than squaring and summing; on it the plain sum, whose gradient is defined at 0."""
    v = v.flatten(1)
    if v.requires_grad and torch.is_grad_enabled():
        return (v * v).sum(1)
    return torch.linalg.vector_norm(v, dim=1).square()


def _batchnorm_features(m: nn.Module, a: Tensor, g: Tensor) -> list[Tensor]:
    """Per-sample γ and β gradients of an eval-mode BatchNorm: Σ_t g_t x̂_t with x̂ = (a − μ)/√(σ² + ε),
    formed as (Σ_t g_t a_t − μ Σ_t g_t)/√(σ² + ε) so that no x̂ the size of the activations is made,
    and Σ_t g_t. a, g (N, C, ...) -> [(N, C)]."""
    assert isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
    assert m.running_mean is not None and m.running_var is not None, "BatchNorm without running statistics"
    if g.dim() > 2:
        gf, af = g.flatten(2), a.flatten(2)  # (N, C, T)
        g_sum, ga = gf.sum(2), torch.einsum("nct,nct->nc", gf, af)  # (N, C)
    else:
        g_sum, ga = g, g * a
    feats = []
    if m.weight is not None and m.weight.requires_grad:
        feats.append((ga - m.running_mean * g_sum) * torch.rsqrt(m.running_var + m.eps))  # γ: (N, C)
    if m.bias is not None and m.bias.requires_grad:
        feats.append(g_sum)  # β: (N, C)
    return feats


def conv_persample_weight_grad(m: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Σ_t g_t â_tᵀ per sample, as the weight gradient of a grouped convolution with one group per
    sample (native kernels; an unfold + bmm is several times slower). a (N, C, H, W), g (N, O, H', W')
    -> (N, O, C, kh, kw)."""
    n, c = a.shape[:2]
    o = g.shape[1]
    w = conv2d_weight(
        a.reshape(1, n * c, *a.shape[2:]),
        (n * o, c, *m.kernel_size),
        g.reshape(1, n * o, *g.shape[2:]),
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=n,  # type: ignore[arg-type]
    )
    return w.view(n, o, c, *m.kernel_size)


def _features(m: nn.Module, pre: Tensor, g: Tensor) -> list[Tensor]:
    """Per-sample weight (and bias) gradients for one cotangent, flattened. g (N, ...) -> [(N, F)]."""
    if isinstance(m, nn.Conv2d):
        feats = [conv_persample_weight_grad(m, pre, g).flatten(1)]  # (N, O·C·kh·kw)
        return feats + ([g.sum((2, 3))] if m.bias is not None else [])
    if isinstance(m, nn.Linear):
        g2 = g.flatten(1, -2)  # (N, T, O)
        feats = [torch.bmm(g2.transpose(1, 2), pre).flatten(1)]  # (N, O·I)
        return feats + ([g2.sum(1)] if m.bias is not None else [])
    return _batchnorm_features(m, pre, g)


def _conv_inner(m: nn.Conv2d, a1: Tensor, g1: Tensor, w2: Tensor) -> Tensor:
    """⟨Σ_t g1_t â1_tᵀ, W2⟩ = ⟨g1, conv(a1; W2)⟩ per sample: a grouped forward convolution with the
    per-sample weights W2 (N, O, C, kh, kw); differentiable in a1 and g1. -> (N,)."""
    n, c = a1.shape[:2]
    out = torch.nn.functional.conv2d(
        a1.reshape(1, n * c, *a1.shape[2:]), w2.reshape(-1, c, *m.kernel_size), None, m.stride, m.padding, m.dilation, groups=n
    )
    return (g1 * out.view_as(g1)).flatten(1).sum(1)


def _dot(f1: list[Tensor], f2: list[Tensor]) -> Tensor:
    """Σ over feature tensors of the per-sample inner product. -> (N,)."""
    return sum(((x * y).sum(1) for x, y in zip(f1, f2, strict=True)), torch.zeros(()))


def _ghost(m: nn.Module, a: Tensor) -> bool:
    return isinstance(m, nn.Linear) and a.dim() == 2


def layer_inner(m: nn.Module, a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor) -> Tensor:
    """⟨∇_W(a1, g1), ∇_W(a2, g2)⟩ per sample for one layer, differentiable in all four. -> (N,)."""
    if _ghost(m, a1):
        return (g1 * g2).sum(1) * ((a1 * a2).sum(1) + (1.0 if m.bias is not None else 0.0))  # ghost norm
    if isinstance(m, nn.Conv2d):
        inner = _conv_inner(m, a1, g1, conv_persample_weight_grad(m, a2, g2))
        return inner + ((g1.sum((2, 3)) * g2.sum((2, 3))).sum(1) if m.bias is not None else 0.0)
    return _dot(_features(m, _prepare(m, a1), g1), _features(m, _prepare(m, a2), g2))


def _stack_conv(m: nn.Module, gs: list[Tensor]) -> bool:
    """Small feature maps (T ≤ 256 positions) make many tiny per-sample GEMMs; one unfold and one
    batched GEMM over all cotangents is faster there (measured on CPU); larger maps use grouped convs."""
    small = len(gs) > 1 and gs[0].shape[2] * gs[0].shape[3] <= 256
    return isinstance(m, nn.Conv2d) and not isinstance(m.padding, str) and small


def _conv_features_stacked(m: nn.Conv2d, a: Tensor, gs: list[Tensor]) -> list[list[Tensor]]:
    """Per-sample weight (and bias) gradients of a conv layer for all cotangents at once. -> [[(N, F)]]."""
    assert not isinstance(m.padding, str)
    u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C·kh·kw, T)
    g = torch.stack([x.flatten(2) for x in gs], 1)  # (N, m, O, T)
    n, k, o, t = g.shape
    w = torch.bmm(g.reshape(n, k * o, t), u.transpose(1, 2)).view(n, k, -1)  # (N, m, O·C·kh·kw)
    bias = g.sum(3) if m.bias is not None else None  # (N, m, O)
    return [[w[:, j]] + ([bias[:, j]] if bias is not None else []) for j in range(k)]


def _conv_ghost(m: nn.Conv2d, a: Tensor, gs: list[Tensor]) -> bool:
    """Ghost norms for a conv layer pay off on small maps with many channels: per sample they cost
    T²·(C·kh·kw + m·O) multiply-adds (the patch Gram matrix once, then one product per cotangent)
    against m·O·C·kh·kw·T for the per-sample weight gradients (T output positions, m cotangents)."""
    if isinstance(m.padding, str):  # "same"/"valid": unfold needs numbers
        return False
    t, o = gs[0].shape[2] * gs[0].shape[3], gs[0].shape[1]
    ck = a.shape[1] * m.kernel_size[0] * m.kernel_size[1]
    return t * (ck + len(gs) * o) < len(gs) * o * ck


def _conv_ghost_products(m: nn.Conv2d, a: Tensor, gs: list[Tensor], ref: int | None) -> tuple[Tensor, Tensor | None]:
    """⟨∇_W_j, ∇_W_r⟩ = Σ_{t,s} (g_j,t · g_r,s)(â_t · â_s + [bias]) per sample for all cotangents j,
    without per-sample weight gradients: U = ÂᵀÂ (N, T, T) once, then V_j = g_j U.
    a (N, C, H, W), gs [(N, O, H', W')] -> diag (N, m), cross (N, m) or None."""
    assert not isinstance(m.padding, str)
    u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C·kh·kw, T)
    gram = torch.bmm(u.transpose(1, 2), u)  # (N, T, T)
    if m.bias is not None:
        gram = gram + 1.0  # the bias gradient Σ_t g_t: ‖Σ_t g_t‖² = Σ_{t,s} g_t · g_s
    g = torch.stack([x.flatten(2) for x in gs], 1)  # (N, m, O, T)
    v = torch.matmul(g, gram.unsqueeze(1))  # (N, m, O, T)
    cross = (v * g[:, ref : ref + 1]).sum((2, 3)) if ref is not None else None  # (N, m)
    return (v * g).sum((2, 3)), cross


def param_products(tape: Tape, grads: list[list[Tensor]], ref: int | None, conv_ghost: bool = True) -> tuple[Tensor, Tensor | None]:
    """For m cotangents (grads[j][l]: layer l's output gradient for cotangent j), per sample:
    diag (N, m) = ‖∇_θ_j‖² and, when ref is given, cross (N, m) = ⟨∇_θ_j, ∇_θ_ref⟩ — the sums over
    layers of `layer_products`."""
    layers = [layer_products(site, [g[i] for g in grads], ref, conv_ghost) for i, site in enumerate(tape.sites)]
    diag = torch.stack([d for d, _ in layers]).sum(0)
    return diag, (torch.stack([c for _, c in layers if c is not None]).sum(0) if ref is not None else None)


def layer_products(site: Site, gs: list[Tensor], ref: int | None, conv_ghost: bool = True) -> tuple[Tensor, Tensor | None]:
    """One layer's share of `param_products`: diag (N, m) = ‖∇_{θ_l} c_j·z‖² and cross (N, m) =
    ⟨∇_{θ_l} c_j·z, ∇_{θ_l} c_ref·z⟩ from its input and its output gradients gs[j] (N, ...).
    conv_ghost=False never takes the ghost-norm path for convolutions (to measure what it buys)."""
    mod, a = site.module, site.a
    if _ghost(mod, a):
        aa = sq_norm(a) + (1.0 if mod.bias is not None else 0.0)  # (N,)
        diag = torch.stack([sq_norm(g) * aa for g in gs], 1)
        cross = torch.stack([(g * gs[ref]).sum(1) * aa for g in gs], 1) if ref is not None else None
        return diag, cross
    if conv_ghost and isinstance(mod, nn.Conv2d) and _conv_ghost(mod, a, gs):
        return _conv_ghost_products(mod, a, gs, ref)
    if isinstance(mod, nn.Conv2d) and _stack_conv(mod, gs):
        feats = _conv_features_stacked(mod, a, gs)
    else:
        feats = [_features(mod, _prepare(mod, a), g) for g in gs]
    diag = torch.stack([sum((sq_norm(t) for t in f), torch.zeros(())) for f in feats], 1)
    return diag, (torch.stack([_dot(f, feats[ref]) for f in feats], 1) if ref is not None else None)
