"""A gradient-step probe beside the learned detector's features: a part-B study (docs/detection.md#detector-options).

    python -m bench.probe_study --model cifar10 --sigma 0.00784 --squeezers median2,blur05 \
      --attacks <fit-detector's attacks> --controls <its controls> --options "<bench.detector_options configuration>" \
      --out bench/results/probe-study-cifar10

Hu et al. (NeurIPS 2019, arXiv 1907.00189) tell adversarial images by two criteria at once: robust to
random noise, yet easy to move by a gradient step. The detector's features have the first (the
neighbourhood Fisher) and only the linear part of the second (the margin and ‖∇_x s‖). The probe adds
the rest: with r the runner-up class and d = z_r − z_ŷ, one signed step x' = clip(x + τ sign ∇_x d)
towards r, and per step size τ

- `probe_gain/τ`: d(x') − d(x), how far the step moved the pair;
- `probe_ratio/τ`: that gain over its linear prediction τ‖∇_x d‖₁ (< 1: the step saturates);
- `probe_maxp/τ`: log max_k p_k(x'), how confident the prediction is after the step;
- `probe_turned/τ`: whether x' is read as r;

and `probe_l1`, log10 ‖∇_x d‖₁. One backward and one forward per τ beyond the classifier's forward.

The study trains the same configuration on part A with and without the probe columns, as
`fisherguard fit-detector` does (service.lab.learn, the same cached attacks and features), and measures
both on part B (bench.detector_options.row: mean TPR, left-out families, the controls' false alarms).
Nothing here is shipped; the evaluation half is not read.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.common import environment, write
from bench.detector_options import markdown, options, row
from service.cli.common import default_data
from service.core import features
from service.core.bundle import Bundle, load_bundle
from service.core.features import FeatureSpec
from service.lab import learn
from service.lab.attack_specs import parse_attack

TAUS = (1 / 255, 4 / 255)  # step sizes: the image's own quantum, and the middle of the training attacks' radii


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


def with_probe(
    bundle: Bundle, c: learn.Collected, attacks: list[str], controls: list[str], limits: dict[str, int], cache: Path
) -> learn.Collected:
    """c with the probe columns added to every table (the images re-read from the attack cache, in the same order)."""
    data = {p: c.parts[p] for p in ("a", "b")}
    for p, part in data.items():
        sets = c.sets[p]
        clean = probe(bundle.model, part.x)
        sets.clean |= clean
        for spec in (*attacks, *controls):
            x, _, _ = learn.attacked(bundle, part, parse_attack(spec, bundle), limits[p], cache)
            sets.adv[spec] |= probe(bundle.model, x) if len(x) else {k: np.zeros(0) for k in clean}  # no successful image
    names = [*c.names, *(k for k in c.sets["a"].clean if k.startswith("probe_"))]
    return learn.Collected(c.sets, c.attacks, c.controls, c.families, c.stats, names, c.parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sigma", type=float, required=True)
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--squeezers", required=True)
    ap.add_argument("--attacks", required=True)
    ap.add_argument("--controls", required=True)
    ap.add_argument("--options", required=True, help="one bench.detector_options configuration, e.g. 'mlp cw=10 margin=4 ...'")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--validate-limit", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path(".cache/attacks"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model)
    spec = FeatureSpec(a.sigma, a.draws, tuple(a.squeezers.split(",")))
    attacks, controls = a.attacks.split(","), a.controls.split(",")
    c = learn.collect(bundle, default_data(bundle.card), attacks, controls, spec, a.limit, a.validate_limit, a.cache, log=print)
    opts = options(a.options, spec)
    rows = [row(c, a.options, opts)]
    # the probe's columns are a study's, not the product's: a group of their own, for this process only
    features.GROUPS["probe"] = ("probe_l1", "probe_gain", "probe_ratio", "probe_maxp", "probe_turned")
    probed = with_probe(bundle, c, attacks, controls, {"a": a.limit, "b": a.validate_limit}, a.cache)
    rows.append(row(probed, f"{a.options} + probe", opts))
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "probe.json", {"environment": environment("cpu"), "model": a.model, "taus": TAUS, "controls": controls, "rows": rows})
    (a.out / "probe.md").write_text(markdown(rows, controls))
    print(markdown(rows, controls))


if __name__ == "__main__":
    main()
