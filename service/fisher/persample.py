"""Per-sample inner products of parameter gradients without per-sample gradients of the whole model.

For a layer o = f(a; W) applied once per sample, the per-sample weight gradient of a scalar with
output gradient g is linear in g and in a: Linear gives g aᵀ, Conv2d gives Σ_t g_t â_tᵀ over the
unfolded patches â_t, BatchNorm gives Σ_t g_t x̂_t per channel. So for two (a, g) pairs the inner
product ⟨∇_W, ∇_W'⟩ needs no P-sized per-sample tensor for Linear layers on flat inputs
("ghost norm": ⟨g aᵀ, g' a'ᵀ⟩ = (g·g')(a·a')) and only a small per-sample weight-sized tensor for
convolutions and normalisation layers. The whole-model inner product is the sum over layers.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def intact(self) -> bool:
        """No recorded tensor was modified in place after it was recorded, and no layer ran twice."""
        now = [(s.a._version, s.o._version) for s in self.sites]
        return now == self.versions and len({id(s.module) for s in self.sites}) == len(self.sites)


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
def record(model: nn.Module, protect: bool = False) -> Iterator[Tape]:
    """Records every call of a parametrised layer during the forward passes inside the block.

    With protect=True each recorded output is handed on as a copy, so that in-place operations
    downstream (ReLU(inplace=True), `out += identity`) cannot overwrite it.
    """
    tape = Tape()

    def hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        tape.sites.append(Site(mod, args[0], out))
        tape.versions.append((args[0]._version, out._version))
        return out.clone() if protect else out

    hooks = [m.register_forward_hook(hook) for m in model.modules() if _owns_params(m)]
    try:
        yield tape
    finally:
        for h in hooks:
            h.remove()


def _conv_features(m: nn.Conv2d, a: Tensor, g: Tensor) -> list[Tensor]:
    """Per-sample conv weight and bias gradients. a (N, C, H, W), g (m, N, O, H', W') -> [(m, N, F)]."""
    u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C·kh·kw, T)
    gt = g.flatten(3)  # (m, N, O, T)
    feats = [torch.einsum("jnot,nct->jnoc", gt, u).flatten(2)]  # (m, N, O·C·kh·kw)
    if m.bias is not None:
        feats.append(gt.sum(3))  # (m, N, O)
    return feats


def _bn_features(m: nn.Module, a: Tensor, g: Tensor) -> list[Tensor]:
    """Per-sample BatchNorm γ, β gradients (eval statistics). a (N, C, ...), g (m, N, C, ...)."""
    assert isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
    shape = (1, -1) + (1,) * (a.dim() - 2)
    mean, var = m.running_mean, m.running_var
    assert mean is not None and var is not None, "BatchNorm without running statistics"
    xhat = (a - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps)  # (N, C, ...)
    dims = tuple(range(3, g.dim()))
    feats = []
    if m.weight is not None and m.weight.requires_grad:
        feats.append((g * xhat).sum(dims) if dims else g * xhat)  # (m, N, C)
    if m.bias is not None and m.bias.requires_grad:
        feats.append(g.sum(dims) if dims else g)
    return feats


def _linear_features(m: nn.Linear, a: Tensor, g: Tensor) -> list[Tensor]:
    """Per-sample Linear gradients for inputs with extra dims. a (N, T.., I), g (m, N, T.., O)."""
    a2, g2 = a.flatten(1, -2), g.flatten(2, -2)  # (N, T, I), (m, N, T, O)
    feats = [torch.einsum("jnto,nti->jnoi", g2, a2).flatten(2)]
    if m.bias is not None:
        feats.append(g2.sum(2))
    return feats


def _features(m: nn.Module, a: Tensor, g: Tensor) -> list[Tensor]:
    if isinstance(m, nn.Conv2d):
        return _conv_features(m, a, g)
    if isinstance(m, nn.Linear):
        return _linear_features(m, a, g)
    return _bn_features(m, a, g)


def _gram(f1: list[Tensor], f2: list[Tensor]) -> Tensor:
    """Σ over feature tensors of ⟨f1_i, f2_j⟩ per sample. [(m1, N, F)], [(m2, N, F)] -> (N, m1, m2)."""
    return sum((torch.einsum("inf,jnf->nij", x, y) for x, y in zip(f1, f2, strict=True)), torch.zeros(()))


def layer_gram(m: nn.Module, a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor) -> Tensor:
    """⟨∇_W(a1, g1_i), ∇_W(a2, g2_j)⟩ per sample for one layer. g: (m, N, ...) -> (N, m1, m2)."""
    if isinstance(m, nn.Linear) and a1.dim() == 2:
        gg = torch.einsum("ino,jno->nij", g1, g2)  # (N, m1, m2)
        aa = (a1 * a2).sum(1) + (1.0 if m.bias is not None else 0.0)  # (N,) ghost norm, bias adds 1
        return gg * aa[:, None, None]
    same = a1 is a2 and g1 is g2
    f1 = _features(m, a1, g1)
    return _gram(f1, f1 if same else _features(m, a2, g2))


def param_gram(tape: Tape, grads: list[Tensor]) -> Tensor:
    """Per-sample Gram of whole-model parameter gradients for m cotangents. -> (N, m, m)."""
    return sum((layer_gram(s.module, s.a, g, s.a, g) for s, g in zip(tape.sites, grads, strict=True)), torch.zeros(()))


def output_grads(tape: Tape, z: Tensor, cotangents: Tensor, create_graph: bool = False) -> list[Tensor]:
    """∂(cotangent·z)/∂o for every recorded layer output, batched over m cotangents. (m, N, K) -> [(m, N, ...)]."""
    outs = [s.o for s in tape.sites]
    if cotangents.shape[0] == 1:
        grads = torch.autograd.grad(z, outs, cotangents[0], retain_graph=True, create_graph=create_graph)
        return [g[None] for g in grads]
    grads = torch.autograd.grad(z, outs, cotangents, retain_graph=True, is_grads_batched=True)
    return list(grads)
