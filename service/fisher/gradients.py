"""One forward that records the layers, and one batched backward of m cotangents at the logits.

The cotangents are rows of ∂(·)/∂z: ∂s/∂z (s the log-odds of ŷ) and e_k − p = ∂ log p_k/∂z for the
chosen classes. Their VJPs give the input gradients (m, N, C, H, W) and every recorded layer's
output gradients, from which `persample` forms per-sample parameter-gradient products.
"""

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from service.fisher import basics, persample


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm on running statistics, no dropout) for the block, then as before."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


_PROTECT: "weakref.WeakKeyDictionary[nn.Module, frozenset[int]]" = weakref.WeakKeyDictionary()


def forward(model: nn.Module, x: Tensor, want_tape: bool) -> tuple[Tensor, persample.Tape | None]:
    """Logits (N, K), and the layer tape when the per-layer identities apply to this model.

    A model that modifies a recorded tensor in place (torchvision's ReLU(inplace=True) after each
    BatchNorm, `out += identity`) needs those layer calls' outputs copied. Which calls is learnt from
    a first forward that copies none and remembered per model, so later calls copy only those (half
    of ResNet-50's layer outputs) and run once; the tape is still checked on every call, and a model
    whose calls cannot be told apart (a layer run twice) gets no tape."""
    if not want_tape or not persample.hookable(model):
        return model(x), None
    protect = _PROTECT.get(model, frozenset())
    while True:  # the remembered copies, then those plus the calls found modified (the logits are right either way)
        with persample.record(model, protect) as tape:
            z = model(x)
        if tape.intact():
            _PROTECT[model] = protect
            return z, tape
        modified = tape.modified()
        if not modified - protect:  # a layer ran twice, or copies did not help: no tape
            return z, None
        protect = protect | modified


def cotangents(z64: Tensor, p: Tensor, y: Tensor, classes: Tensor | None, need_s: bool) -> Tensor:
    """Rows of ∂(·)/∂z: ∂s/∂z, then e_k − p for each chosen class, with 1 − p_k formed stably.
    z64, p (N, K) float64, y (N,), classes (N, m) or None -> (m', N, K) float64."""
    rows = [basics.log_odds_cotangent(z64, y)[None]] if need_s else []
    if classes is not None:
        cot = basics.class_cotangents(p, classes)  # (m, N, K)
        others = z64[None].expand(classes.shape[1], -1, -1).scatter(2, classes.T[:, :, None], float("-inf"))
        one_minus = (torch.logsumexp(others, 2) - torch.logsumexp(z64, 1)[None]).exp()  # (m, N) = 1 − p_k
        rows.append(cot.scatter(2, classes.T[:, :, None], one_minus[:, :, None]))
    return torch.cat(rows)


def normalise(cot: Tensor) -> tuple[Tensor, Tensor]:
    """Rows scaled to max-norm 1 for the float32 backward (a cotangent of size 1 − p̂ ≈ e^-70 would
    underflow once squared); gradients are linear in the cotangent, so scale them back in float64.
    (m, N, K) -> (m, N, K) float32, scale (m, N) float64."""
    scale = cot.abs().amax(2).clamp_min(1e-300)  # (m, N)
    return (cot / scale[:, :, None]).float(), scale


def vjps(z: Tensor, inputs: list[Tensor], cot: Tensor) -> list[list[Tensor]]:
    """VJPs of m cotangents (m, N, K) to each input: out[j][i] has input i's shape. Small batches
    vmap over the cotangents (one batched backward); larger ones loop, which is faster there."""
    if cot.shape[0] > 1 and z.shape[0] < 4:
        batched = torch.autograd.grad(z, inputs, cot, retain_graph=True, is_grads_batched=True)
        return [[g[j] for g in batched] for j in range(cot.shape[0])]
    return [list(torch.autograd.grad(z, inputs, c, retain_graph=True)) for c in cot]
