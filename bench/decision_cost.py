"""What a default request's verdict costs the engine, against the classifier's own forward+backward.

    python -m bench.decision_cost --out bench/results/decision-cost-cpu.json

Per shipped bundle, at one batch size (32 by default), interleaved repeats, medians:
- `forward`: the classifier's forward pass;
- `forward+backward`: forward and one backward of the summed cross-entropy to the input and every
  parameter (what one training step's gradient costs);
- `decision`: `core.scoring.score` for the scores a request without `scores=` gets (confidence,
  entropy, margin and the decision's components), as the service's detector calls it;
- one row per decision component alone.

The goal quoted in docs/performance.md#decision-cost: decision ≤ 3 × forward+backward.
"""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import allocator_argument, environment, interleaved, use_allocator, write
from service.core.bundle import load_bundle
from service.core.scores import DEFAULT
from service.core.scoring import score


def bundle_rows(name: str, batch: int, reps: int) -> dict[str, Any]:
    bundle = load_bundle(name)
    assert bundle.calibration is not None, f"{name} has no calibration"
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *bundle.input_shape), generator=gen)
    y = torch.randint(0, len(bundle.classes), (batch,), generator=gen)
    decision = bundle.calibration.decision_scores
    served = tuple(dict.fromkeys((*DEFAULT, *decision)))

    def forward() -> None:
        with torch.no_grad():
            bundle.model(x)

    def forward_backward() -> None:
        xa = x.clone().requires_grad_(True)
        F.cross_entropy(bundle.model(xa), y, reduction="sum").backward()
        bundle.model.zero_grad(set_to_none=True)

    def scorer(names: tuple[str, ...]) -> Callable[[], object]:
        return lambda: score(bundle, x, names)

    methods = {"forward": forward, "forward+backward": forward_backward, "decision": scorer(served)}
    methods |= {f"component {c}": scorer((c,)) for c in decision}
    seconds = interleaved(methods, reps, "cpu")
    return {
        "bundle": name,
        "batch": batch,
        "decision": list(decision),
        "served_scores": list(served),
        "median_s": seconds,
        "decision_over_forward_backward": seconds["decision"] / seconds["forward+backward"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--models", default="mnist,cifar10")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    allocator_argument(ap)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    use_allocator(a.allocator)
    torch.set_num_threads(a.threads)
    rows = [bundle_rows(m, a.batch, a.reps) for m in a.models.split(",")]
    for r in rows:
        ms = {k: round(v * 1000, 1) for k, v in r["median_s"].items()}
        print(f"{r['bundle']} batch {r['batch']}: {ms}; decision / forward+backward = {r['decision_over_forward_backward']:.2f}")
    write(a.out, {"environment": environment("cpu"), "reps": a.reps, "rows": rows})


if __name__ == "__main__":
    main()
