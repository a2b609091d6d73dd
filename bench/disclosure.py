"""What the disclosure levels leave an attacker (docs/security.md#what-the-levels-buy): on the shipped
bundle's decision, the evaluation harness's adaptive attack with full access to the model, the
detector and its calibration, against a query-only attacker who sees what a `verdict` key sees — the
predicted class and the flag — and runs HopSkipJump (Chen, Jordan & Wainwright 2020; ART's
implementation) on it; and, as the baseline the flag is measured against, the same HopSkipJump on
the classifier's label alone (a service without the detector).

    python -m bench.disclosure --model mnist --limit 20 --out bench/results/disclosure-mnist
    python -m bench.disclosure --model cifar10 --limit 12 --norms linf --out bench/results/disclosure-cifar10

Success means what it means to the attacker: the service answers a class other than the true one and
does not flag the image, for an image within ε of the original (float pixels, as the OIP FP32 input
takes them; no quantisation). The query-only attacker starts from its nearest image of another class
that the service passes (the strongest start HopSkipJump can have; the queries spent finding it are
counted); every query is counted, and the first query that is a success within ε gives "queries to
success". Each attacker's queries also go through the service's query-pattern monitor
(service/serve/monitor.py), beside a stream of distinct clean images, to see whether it would fire.

Images: a seeded subset of the correctly classified, unflagged images of the evaluation half; the
pool of starting images: other unflagged evaluation images. Nothing here chooses anything.
"""

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.common import environment, write
from service.cli.common import default_data
from service.core import decision, scoring
from service.core.bundle import Bundle, load_bundle
from service.lab.attack_specs import parse_attack
from service.lab.data import Dataset, load_dataset, seeded_subset
from service.serve.metrics import Metrics
from service.serve.monitor import QueryMonitor

EPS = {"mnist": {"linf": 0.3, "l2": 3.0}, "cifar10": {"linf": 8 / 255, "l2": 0.5}}  # the harness's adaptive budgets
BUDGETS = (1000, 5000, 10000)
CAP = 12000  # queries per image: HopSkipJump's step-size search can loop for long on a boundary it cannot pin down


class Budget(Exception):
    """The attacker's query budget for one image is spent."""


def verdicts(bundle: Bundle, x: Tensor, detector: bool = True, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """What a `verdict` client sees for images x (N, C, H, W): predicted class (N,) and flag (N,) at the
    calibration's α (never flagged with detector=False: the classifier alone)."""
    cal = bundle.calibration
    assert cal is not None
    classes, flags = [], []
    for i in range(0, len(x), batch):
        r = scoring.score(bundle, x[i : i + batch], cal.decision_scores if detector else ())
        classes.append(r.predicted.numpy())
        flags.append(
            decision.decide(cal, r.thresholded(), cal.alpha, r.predicted.numpy()).flagged if detector else np.zeros(len(r.predicted), bool)
        )
    return np.concatenate(classes), np.concatenate(flags)


def distance(a: np.ndarray, b: np.ndarray, norm: str) -> np.ndarray:
    """‖a − b‖ per image, L∞ or L2: a (N, C, H, W), b (C, H, W) or (N, C, H, W)."""
    d = (a - b).reshape(len(a), -1)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d.astype(np.float64) ** 2).sum(1))


@dataclass
class Oracle:
    """The service as one attacked image's attacker sees it: each query answered with the predicted
    class, or the true class y when flagged (a flagged image is a failure to the attacker), as one-hot
    rows for ART; queries counted, the first success within ε noted, each query hashed by the monitor."""

    bundle: Bundle
    x0: np.ndarray  # (C, H, W)
    y: int
    eps: float
    norm: str
    detector: bool
    monitor: QueryMonitor
    client: str
    queries: int = 0
    flagged: int = 0
    near: int = 0
    first_success: int | None = None
    best: np.ndarray | None = None  # the successful query nearest to x0
    best_distance: float = float("inf")
    k: int = field(init=False)

    def __post_init__(self) -> None:
        self.k = len(self.bundle.classes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.queries >= CAP:
            raise Budget
        x = np.asarray(x, dtype=np.float32).reshape(-1, *self.x0.shape)
        cls, flags = verdicts(self.bundle, torch.from_numpy(x), self.detector)
        ok = (cls != self.y) & ~flags
        d = distance(x, self.x0, self.norm)
        if ok.any() and d[ok].min() < self.best_distance:
            i = int(np.flatnonzero(ok)[np.argmin(d[ok])])
            self.best, self.best_distance = x[i], float(d[i])
        inside = ok & (d <= self.eps * (1 + 1e-6))
        if self.first_success is None and inside.any():
            self.first_success = self.queries + int(np.argmax(inside)) + 1
        self.queries += len(x)
        self.flagged += int(flags.sum())
        self.near += sum(self.monitor.observe(self.client, xi, bool(f)) for xi, f in zip(x, flags, strict=True))
        return np.eye(self.k, dtype=np.float32)[np.where(ok, cls, self.y)]


def start(oracle: Oracle, pool: np.ndarray, pool_y: np.ndarray, batch: int = 16) -> np.ndarray | None:
    """The pool image of another class nearest (L2) to x0 that the oracle passes as a success, asking in
    order of distance, `batch` at a time (the queries are counted); None when there is none."""
    order = [i for i in np.argsort(distance(pool, oracle.x0, "l2")) if pool_y[i] != oracle.y]
    for i in range(0, len(order), batch):
        pick = order[i : i + batch]
        ok = oracle(pool[pick]).argmax(1) != oracle.y
        if ok.any():
            return pool[pick[int(np.argmax(ok))]]
    return None


def hop_skip_jump(oracle: Oracle, init: np.ndarray, iters: int) -> np.ndarray:
    """ART's HopSkipJump, untargeted, on the oracle's answers, from `init`; the final image (C, H, W), or
    when the oracle's CAP on queries stops it, the nearest image the service passed."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    box = BlackBoxClassifier(oracle, oracle.x0.shape, oracle.k, clip_values=(0.0, 1.0))
    attack = HopSkipJump(
        box, batch_size=128, norm=np.inf if oracle.norm == "linf" else 2, max_iter=iters, max_eval=1000, init_eval=100, verbose=False
    )
    try:
        adv = attack.generate(oracle.x0[None], y=np.eye(oracle.k)[[oracle.y]], x_adv_init=init[None])
    except Budget:  # out of queries: the attacker keeps the nearest image the service passed
        return oracle.best if oracle.best is not None else init
    return np.asarray(adv[0], dtype=np.float32)


def query_only(bundle: Bundle, data: Dataset, pool: Dataset, norm: str, eps: float, detector: bool, iters: int) -> dict[str, Any]:
    """HopSkipJump per image on the verdict (or on the label alone); success within ε by query budget."""
    monitor = QueryMonitor(Metrics())
    px, py = pool.x.numpy(), pool.y.numpy()
    rows = []
    for i, (x0, y) in enumerate(zip(data.x.numpy(), data.y.tolist(), strict=True)):
        oracle = Oracle(bundle, x0, y, eps, norm, detector, monitor, f"key:attacker{i}")
        t0 = time.perf_counter()
        init = start(oracle, px, py)
        final = hop_skip_jump(oracle, init, iters) if init is not None else x0
        cls, flags = verdicts(bundle, torch.from_numpy(final[None]), detector)
        d = float(distance(final[None], x0, norm)[0])
        rows.append(
            {
                "queries": oracle.queries,
                "first_success": oracle.first_success,
                "final_distance": d,
                "final_success": bool(cls[0] != y and not flags[0] and d <= eps * (1 + 1e-6)),
                "capped": oracle.queries >= CAP,
                "flagged_queries": oracle.flagged,
                "near_duplicate_queries": oracle.near,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(norm, "detector" if detector else "label only", i, rows[-1], flush=True)
    return summary(rows)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n, hits = len(rows), [int(r["first_success"]) for r in rows if r["first_success"] is not None]
    q = sum(r["queries"] for r in rows)
    return {
        "images": n,
        "success_within_budget": {str(b): sum(1 for v in hits if v <= b) / n for b in BUDGETS},
        "success": len(hits) / n,
        "median_queries_to_success": float(np.median(hits)) if hits else None,
        "median_final_distance": float(np.median([r["final_distance"] for r in rows])),
        "queries_per_image": q / n,
        "capped_images": sum(1 for r in rows if r.get("capped")),
        "flagged_share_of_queries": sum(r["flagged_queries"] for r in rows) / max(q, 1),
        "near_duplicate_share_of_queries": sum(r["near_duplicate_queries"] for r in rows) / max(q, 1),
        "seconds_per_image": float(np.median([r["seconds"] for r in rows])),
        "per_image": rows,
    }


def white_box(bundle: Bundle, data: Dataset, norm: str, eps: float) -> dict[str, Any]:
    """The harness's adaptive PGD (full access: model, detector, calibration values; 40 steps), judged
    by the same verdict."""
    attack = parse_attack(f"{'adaptive' if norm == 'linf' else 'adaptive_l2'}:{eps}", bundle)
    t0 = time.perf_counter()
    adv = torch.cat([attack.run(bundle.model, data.x[i : i + 50], data.y[i : i + 50]) for i in range(0, len(data.y), 50)])
    cls, flags = verdicts(bundle, adv)
    d = distance(adv.numpy(), data.x.numpy(), norm)
    ok = (cls != data.y.numpy()) & ~flags & (d <= eps * (1 + 1e-6))
    return {
        "images": len(ok),
        "success": float(ok.mean()),
        "flagged": float(flags.mean()),
        "misclassified": float((cls != data.y.numpy()).mean()),
        "gradient_steps": 40,
        "service_queries": 1,
        "seconds_per_image": round((time.perf_counter() - t0) / len(ok), 2),
    }


def monitor_on_clean(bundle: Bundle, pool: Dataset, n: int = 512) -> float:
    """The monitor's near-duplicate share on a stream of n distinct clean images from one client."""
    monitor = QueryMonitor(Metrics())
    x = pool.x[:n].numpy()
    return sum(monitor.observe("key:clean", xi, False) for xi in x) / len(x)


def images(bundle: Bundle, path: Path, limit: int) -> tuple[Dataset, Dataset]:
    """The attacked images (correct, unflagged, a seeded subset) and the pool of starts (the rest of
    the unflagged evaluation images, at most 2,000)."""
    data = load_dataset(path, "evaluation", bundle.classes, bundle.input)
    cls, flags = verdicts(bundle, data.x)
    passed = torch.from_numpy(~flags)
    good = passed & (torch.from_numpy(cls) == data.y)
    chosen = seeded_subset(Dataset(data.x[good], data.y[good], data.description, data.sha256), limit)
    pool = Dataset(data.x[passed][:2000], torch.from_numpy(cls)[passed][:2000], "pool", data.sha256)
    return chosen, pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", default="mnist", choices=sorted(EPS))
    ap.add_argument("--data", type=Path)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--norms", default="linf,l2")
    ap.add_argument("--iters", type=int, default=25, help="HopSkipJump iterations (about 10,000 queries at 25)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.model)
    data, pool = images(bundle, a.data or default_data(bundle.card), a.limit)
    rows: dict[str, Any] = {}
    for norm in a.norms.split(","):
        eps = EPS[a.model][norm]
        rows[norm] = {
            "eps": eps,
            "full access (adaptive PGD)": white_box(bundle, data, norm, eps),
            "verdict only (HopSkipJump on class + flag)": query_only(bundle, data, pool, norm, eps, True, a.iters),
            "label only, no detector (HopSkipJump)": query_only(bundle, data, pool, norm, eps, False, a.iters),
        }
    report = {
        "environment": environment("cpu"),
        "model": a.model,
        "decision": bundle.calibration.decision_scores if bundle.calibration else None,
        "alpha": bundle.calibration.alpha if bundle.calibration else None,
        "images": data.description + f", {len(data.y)} correctly classified and unflagged",
        "hop_skip_jump": {"iterations": a.iters, "max_eval": 1000, "init_eval": 100},
        "query_cap": CAP,
        "monitor_near_duplicate_share_on_clean": monitor_on_clean(bundle, pool),
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    write(a.out / "disclosure.json", report)
    (a.out / "disclosure.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict[str, Any]) -> str:
    f = lambda v: "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        f"# {r['model']}: what each disclosure level leaves an attacker",
        "",
        f"Decision: {', '.join(r['decision'])} at α = {r['alpha']}. Images: {r['images']}.",
        f"HopSkipJump: {r['hop_skip_jump']}, at most {r.get('query_cap', CAP)} queries per image. The query monitor's near-duplicate share on distinct clean images: "
        f"{r['monitor_near_duplicate_share_on_clean']:.3f}.",
        "",
        "| norm, ε | attacker | success within ε | ≤ 1k queries | ≤ 5k | ≤ 10k | median queries to success | queries per image | flagged share of queries | near-duplicate share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for norm, row in r["rows"].items():
        for who, s in row.items():
            if who == "eps":
                continue
            w = s.get("success_within_budget", {})
            lines.append(
                f"| {norm}, {row['eps']:.4g} | {who} | {s['success']:.2f} | {f(w.get('1000'))} | {f(w.get('5000'))} | {f(w.get('10000'))} | "
                f"{f(s.get('median_queries_to_success'))} | {f(s.get('queries_per_image', s.get('service_queries')))} | "
                f"{f(s.get('flagged_share_of_queries'))} | {f(s.get('near_duplicate_share_of_queries'))} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
