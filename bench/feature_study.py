"""Extra columns beside the learned detector's features: part-B studies (docs/detection.md#detector-options).

    python -m bench.feature_study --extra probe --model cifar10 --sigma 0.00784 --squeezers median2,blur05 \
      --attacks <fit-detector's attacks> --controls <its controls> --options "<bench.detector_options configuration>" \
      --out bench/results/feature-study-probe-cifar10

`--extra probe`: a gradient-step probe. Hu et al. (NeurIPS 2019, arXiv 1907.00189) tell adversarial
images by two criteria at once: robust to random noise, yet easy to move by a gradient step. The
detector's features have the first (the neighbourhood Fisher) and only the linear part of the second
(the margin and ‖∇_x s‖). The probe adds the rest: with r the runner-up class and d = z_r − z_ŷ, one
signed step x' = clip(x + τ sign ∇_x d) towards r, and per step size τ

- `probe_gain/τ`: d(x') − d(x), how far the step moved the pair;
- `probe_ratio/τ`: that gain over its linear prediction τ‖∇_x d‖₁ (< 1: the step saturates);
- `probe_maxp/τ`: log max_k p_k(x'), how confident the prediction is after the step;
- `probe_turned/τ`: whether x' is read as r;

and `probe_l1`, log10 ‖∇_x d‖₁. One backward and one forward per τ beyond the classifier's forward.

`--extra knn`: the deep k-nearest-neighbours view (Papernot & McDaniel 2018, arXiv 1803.04765) at the
classifier's last layer: the input h (N, D) of its final Linear, L2-normalised, against a bank of
`BANK` seeded training images the classifier reads right, and

- `knn_other`: the share of the k = 50 nearest bank images whose label is not ŷ;
- `knn_same`: minus the mean cosine similarity of the 5 nearest bank images labelled ŷ;
- `knn_gap`: the mean similarity of the 5 nearest labelled otherwise, minus that of the 5 labelled ŷ.

An image read as ŷ but lying among other classes' images is what a small attack leaves; noise that
leaves the prediction alone should leave the neighbours too. One matrix product with the bank per image.

The study trains the same configuration on part A with and without the extra columns, as
`fisherguard fit-detector` does (service.lab.learn, the same cached attacks and features), and measures
both on part B (bench.detector_options.row: mean TPR, left-out families, the controls' false alarms).
Nothing here is shipped; the evaluation half is not read.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.common import environment, write
from bench.detector_options import add_study_arguments, collected, markdown, options, row
from service.cli.common import default_data
from service.core import features
from service.core.bundle import Bundle
from service.lab import learn
from service.lab.attack_specs import parse_attack
from service.lab.data import load_train_subset

TAUS = (1 / 255, 4 / 255)  # step sizes: the image's own quantum, and the middle of the training attacks' radii
BANK, NEAREST, CLOSEST = 10_000, 50, 5  # kNN: bank images, neighbours counted, neighbours averaged per side


def pair_gap(z: Tensor, y: Tensor, r: Tensor) -> Tensor:
    """d = z_r − z_ŷ: logits z (N, K), classes ŷ, r (N,) -> (N,)."""
    return z.gather(1, r[:, None])[:, 0] - z.gather(1, y[:, None])[:, 0]


def probe(model: nn.Module, x: Tensor, taus: tuple[float, ...] = TAUS, batch: int = 100) -> dict[str, np.ndarray]:
    """The probe columns of images x (N, C, H, W) in [0, 1] (module docstring). -> column -> (N,) float64."""
    out: dict[str, list[Tensor]] = {}
    for xb in x.split(batch):
        xr = xb.clone().requires_grad_(True)
        z = model(xr)  # (n, K)
        top = z.topk(2, 1).indices
        y, r = top[:, 0], top[:, 1]
        (g,) = torch.autograd.grad(pair_gap(z, y, r).sum(), xr)  # (n, C, H, W) ∇_x d
        with torch.no_grad():
            d, l1 = pair_gap(z, y, r).double(), g.abs().flatten(1).sum(1).double()
            cols = {"probe_l1": l1.clamp_min(1e-30).log10()}
            for tau in taus:
                zp = model((xb + tau * g.sign()).clamp(0, 1)).double()  # (n, K) at x'
                k = f"{tau * 255:g}"
                gain = pair_gap(zp, y, r) - d
                cols[f"probe_gain/{k}"] = gain
                cols[f"probe_ratio/{k}"] = gain / (tau * l1).clamp_min(1e-30)
                cols[f"probe_maxp/{k}"] = torch.log_softmax(zp, 1).amax(1)
                cols[f"probe_turned/{k}"] = (zp.argmax(1) == r).double()
        for name, v in cols.items():
            out.setdefault(name, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def last_layer_input(model: nn.Module, x: Tensor, batch: int = 200) -> tuple[Tensor, Tensor]:
    """The input h (N, D) of the model's final nn.Linear and the logits (N, K) of x, float64."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    kept: list[Tensor] = []
    hook = head.register_forward_hook(lambda _m, i, _o: kept.append(i[0].detach()))
    try:
        with torch.no_grad():
            z = torch.cat([model(xb) for xb in x.split(batch)])
    finally:
        hook.remove()
    return torch.cat(kept).double(), z.double()


@dataclass
class Bank:
    """Normalised last-layer inputs (B, D) of training images the classifier reads right, and their labels (B,)."""

    h: Tensor
    y: Tensor

    @classmethod
    def of(cls, model: nn.Module, x: Tensor, y: Tensor) -> "Bank":
        h, z = last_layer_input(model, x)
        right = z.argmax(1) == y
        counts = torch.bincount(y[right], minlength=z.shape[1])
        if (counts < CLOSEST).any():  # knn_same would average fewer than CLOSEST neighbours, or none
            raise ValueError(f"the bank needs ≥ {CLOSEST} images read right per class; it has {counts.tolist()}")
        return cls(nn.functional.normalize(h[right], dim=1), y[right])


def closest(sim: Tensor, mask: Tensor) -> Tensor:
    """The mean of the CLOSEST largest similarities (n, B) where mask (n, B) holds. -> (n,)"""
    return torch.where(mask, sim, torch.full_like(sim, -2.0)).topk(CLOSEST, 1).values.mean(1)


def knn(model: nn.Module, x: Tensor, bank: Bank, batch: int = 500) -> dict[str, np.ndarray]:
    """The kNN columns of images x (N, C, H, W) (module docstring). -> column -> (N,) float64."""
    h, z = last_layer_input(model, x)
    out: dict[str, list[Tensor]] = {}
    for hb, zb in zip(h.split(batch), z.split(batch), strict=True):
        y = zb.argmax(1)
        sim = nn.functional.normalize(hb, dim=1) @ bank.h.T  # (n, B) cosine similarities
        same = bank.y[None] == y[:, None]  # (n, B)
        near = sim.topk(NEAREST, 1).indices
        near_same, near_other = closest(sim, same), closest(sim, ~same)
        cols = {"knn_other": (bank.y[near] != y[:, None]).double().mean(1), "knn_same": -near_same, "knn_gap": near_other - near_same}
        for name, v in cols.items():
            out.setdefault(name, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


EXTRAS = {  # --extra: the columns' group (features.GROUPS) and how to compute them
    "probe": ("probe_l1", "probe_gain", "probe_ratio", "probe_maxp", "probe_turned"),
    "knn": ("knn_other", "knn_same", "knn_gap"),
}


def with_extra(
    bundle: Bundle,
    c: learn.Collected,
    columns: Callable[[Tensor], dict[str, np.ndarray]],
    specs: list[str],
    limits: dict[str, int],
    cache: Path,
) -> learn.Collected:
    """c with columns(x) added to every table (the images re-read from the attack cache, in the same order)."""
    before = set(c.sets["a"].clean)
    for p in ("a", "b"):
        sets, part = c.sets[p], c.parts[p]
        clean = columns(part.x)
        sets.clean |= clean
        for spec in specs:
            x, _, _ = learn.attacked(bundle, part, parse_attack(spec, bundle), limits[p], cache)
            sets.adv[spec] |= columns(x) if len(x) else {k: np.zeros(0) for k in clean}  # no successful image
    names = [*c.names, *(k for k in c.sets["a"].clean if k not in before)]
    return learn.Collected(c.sets, c.attacks, c.controls, c.families, c.stats, names, c.parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--extra", required=True, choices=sorted(EXTRAS))
    ap.add_argument("--options", required=True, help="one bench.detector_options configuration, e.g. 'mlp cw=10 margin=4 ...'")
    add_study_arguments(ap)
    a = ap.parse_args()
    bundle, spec, c = collected(a)
    attacks, controls = c.attacks, c.controls
    opts = options(a.options, spec)
    rows = [row(c, a.options, opts)]
    if a.extra == "probe":
        columns: Callable[[Tensor], dict[str, np.ndarray]] = partial(probe, bundle.model)
    else:
        columns = partial(knn, bundle.model, bank=Bank.of(bundle.model, *load_train_subset(default_data(bundle.card), BANK)))
    # the extra columns are a study's, not the product's: a group of their own, for this process only
    features.GROUPS[a.extra] = EXTRAS[a.extra]
    extended = with_extra(bundle, c, columns, [*attacks, *controls], {"a": a.limit, "b": a.validate_limit}, a.cache)
    rows.append(row(extended, f"{a.options} + {a.extra}", opts))
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "study.json", {"environment": environment("cpu"), "model": a.model, "extra": a.extra, "controls": controls, "rows": rows})
    (a.out / "study.md").write_text(markdown(rows, controls))
    print(markdown(rows, controls))


if __name__ == "__main__":
    main()
