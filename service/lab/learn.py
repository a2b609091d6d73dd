"""Training the learned detector (`fisherguard fit-detector`, docs/detection.md#learned-detector).

Part A of the calibration half trains it: its clean, correctly classified images and benign controls
of them are the negatives, the successful training attacks on a seeded subset of them the positives.
Part B validates it: for every training family F a model trained without F is measured on F's attacks
on part-B images (leave one family out), beside the clean part-B images that set the thresholds.
Attacks of families the detector is not trained on are not looked at here at all: they are kept for
the evaluation half.
"""

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.core.batches import cat_dicts, device_of, map_batches
from service.core.bundle import Bundle
from service.core.calibration import conformal_p_value
from service.core.features import GROUPS, FeatureSpec, RawFeatures, extract, group
from service.core.features import VERSION as FEATURES_VERSION
from service.core.learned import LearnedDetector
from service.core.scoring import predict
from service.lab import attack_cache
from service.lab.attack_specs import Attack, parse_attack
from service.lab.data import Dataset, load_dataset, seeded_pick
from service.lab.evaluate import ALPHAS, cached_attack, read_right
from service.lab.stats import roc_auc

Table = dict[str, np.ndarray]  # column -> (N,), plus "shift" (N, K) and "predicted" (N,)


@dataclass
class Options:
    """How the detector is built and trained."""

    spec: FeatureSpec
    kind: str = "linear"  # or "mlp"
    hidden: int = 32
    l2: float = 1e-3  # weight decay on the standardised inputs
    control_weight: float = 3.0  # total weight of the controls, relative to the clean images'
    control_margin: float = 0.0  # the controls are fitted as if their logit were this much larger: pushed below the clean tail
    nuisance: bool = False  # make the model blind to the directions in which the controls move the features
    # with nuisance: one direction per listed control family (all its specs pooled), not one per control
    nuisance_families: tuple[str, ...] = ()
    # "still-right": a control's negatives are only the changed images the classifier still reads right (one it
    # misreads is one the decision should flag: docs/detection.md#cifar-10-controls-the-classifier-misreads)
    control_negatives: str = "all"
    seed: int = 0
    without: tuple[str, ...] = ()  # feature groups (core.features.GROUPS) or columns by the name before any "/" left out

    def __post_init__(self) -> None:
        heads = {h for hs in GROUPS.values() for h in hs}
        unknown = [g for g in self.without if g not in GROUPS and g not in heads]
        if unknown:
            raise ValueError(
                f"unknown feature groups or columns {unknown}; groups: {', '.join(GROUPS)}; columns: {', '.join(sorted(heads))}"
            )
        if self.control_negatives not in ("all", "still-right"):
            raise ValueError(f"control negatives {self.control_negatives!r}: expected 'all' or 'still-right'")
        if self.nuisance_families and not self.nuisance:
            raise ValueError(f"nuisance families {list(self.nuisance_families)} given without nuisance: pass --nuisance as well")


@dataclass
class Sets:
    """Feature tables of one part: clean images, and per attack or control spec its kept images."""

    clean: Table
    adv: dict[str, Table] = field(default_factory=dict)
    right: dict[str, np.ndarray] = field(default_factory=dict)  # per control: which of its rows the classifier still reads right


def still_right(sets: Sets, control: str) -> Table:
    """The rows of a control's table whose changed image the classifier still reads right."""
    if control not in sets.right:
        raise ValueError(f"control {control!r} has no record of which images the classifier still reads right")
    keep = sets.right[control]
    return {k: v[keep] for k, v in sets.adv[control].items()}


def correct(bundle: Bundle, data: Dataset) -> Dataset:
    """The images the model reads right."""
    keep = read_right(bundle, data)
    return Dataset(data.x[keep], data.y[keep], data.description + ", correctly classified", data.sha256)


def features(bundle: Bundle, x: torch.Tensor, spec: FeatureSpec, batch: int = 64) -> Table:
    """The raw feature columns of x, batch by batch, as numpy (float64)."""
    parts = map_batches(lambda xb: extract(bundle.model, xb, spec, bundle.mahalanobis), x, batch=batch, device=device_of(bundle.model))
    table = cat_dicts([p.columns | {"shift": p.shift, "predicted": p.predicted} for p in parts])
    return {k: v.numpy() for k, v in table.items()}


def cached_features(bundle: Bundle, x: torch.Tensor, spec: FeatureSpec, cache: Path | None, key: str) -> Table:
    """`features`, kept in the cache under the images' key and the feature options."""
    digest = hashlib.sha256(f"{key}|{spec}|{bundle.mahalanobis is not None}|{FEATURES_VERSION}".encode()).hexdigest()[:16]
    path = cache / f"features-{digest}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    table = features(bundle, x, spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **table)  # type: ignore[arg-type]
    return table


def clean_key(bundle: Bundle, data: Dataset) -> str:
    """What identifies a part's clean images: the weights and the data (its file's digest and the split)."""
    return hashlib.sha256(f"{bundle.weights_sha256}|{data.sha256}|{data.description}".encode()).hexdigest()[:16]


def attacked(
    bundle: Bundle, data: Dataset, attack: Attack, limit: int, cache: Path | None, batch: int = 100
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The attack on a seeded subset of `limit` images, 8-bit quantised; successful ones only (a control
    keeps every image); and the key its images are kept under (service.lab.attack_cache)."""
    pick = torch.from_numpy(seeded_pick(len(data.y), limit))
    x, y = data.x[pick], data.y[pick]
    adv, _, key = cached_attack(bundle, attack, x, y, cache, batch)
    keep = torch.ones(len(y), dtype=torch.bool) if attack.control else predict(bundle, adv) != y
    return adv[keep], y[keep], key


def shift_stats(table: Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted class c the clean mean and standard deviation of the shift of z_k − z_c (K, K);
    classes with fewer than 2 clean images take the pooled values."""
    shift, pred = table["shift"], table["predicted"]
    mu, sd = np.tile(shift.mean(0), (k, 1)), np.tile(shift.std(0) + 1e-9, (k, 1))
    for c in range(k):
        rows = shift[pred == c]
        if len(rows) >= 2:
            mu[c], sd[c] = rows.mean(0), rows.std(0) + 1e-9
    return mu, sd


def columns(table: Table) -> list[str]:
    """The detector's input columns: every feature column of the table, then Roth et al.'s noise shift."""
    return [n for n in table if n not in ("shift", "predicted")] + ["noise_shift"]


def raw(table: Table) -> RawFeatures:
    cols = {k: torch.from_numpy(v) for k, v in table.items() if k not in ("shift", "predicted")}
    return RawFeatures(torch.zeros(0), torch.from_numpy(table["predicted"]).long(), cols, torch.from_numpy(table["shift"]))


def by_family(groups: list[torch.Tensor], controls: Sequence[str], families: dict[str, str] | None, opts: Options) -> list[torch.Tensor]:
    """The controls' feature rows pooled per family of `opts.nuisance_families` (the others dropped), in that order."""
    if families is None:
        raise ValueError("nuisance families need each control's family")
    unknown = [f for f in opts.nuisance_families if f not in {families[c] for c in controls}]
    if unknown:
        raise ValueError(f"nuisance families {unknown} are not among the controls' families {sorted({families[c] for c in controls})}")
    return [torch.cat([g for g, c in zip(groups, controls, strict=True) if families[c] == f]) for f in opts.nuisance_families]


def train(
    a: Sets,
    attacks: Sequence[str],
    controls: Sequence[str],
    opts: Options,
    names: list[str],
    stats: tuple[np.ndarray, np.ndarray],
    families: dict[str, str] | None = None,
) -> LearnedDetector:
    """Fits the model: clean part-A images (weight 1 in all), the controls (`control_weight` in all, the
    same for each; with `opts.control_negatives` "still-right" only their images read right) negatives;
    the attacks (weight 1 in all, the same for each) positives. families maps each control to its
    family (needed for `opts.nuisance_families`)."""
    mu, sd = (torch.from_numpy(s) for s in stats)
    empty = LearnedDetector(opts.spec, tuple(names), mu, sd, torch.zeros(len(names)), torch.ones(len(names)), {})
    groups = (
        [(a.clean, 0.0, 1.0)]
        + [
            (still_right(a, c) if opts.control_negatives == "still-right" else a.adv[c], 0.0, opts.control_weight / len(controls))
            for c in controls
        ]
        + [(a.adv[s], 1.0, 1.0 / len(attacks)) for s in attacks if len(a.adv[s]["margin"])]
    )
    mats = [empty.matrix(raw(t)) for t, _, _ in groups]  # unstandardised yet: mean 0, std 1
    x = torch.cat(mats)
    y = torch.cat([torch.full((len(m),), label, dtype=torch.float64) for m, (_, label, _) in zip(mats, groups, strict=True)])
    w = torch.cat(
        [torch.full((len(m),), weight / max(len(m), 1), dtype=torch.float64) for m, (_, _, weight) in zip(mats, groups, strict=True)]
    )
    mean, std = x.mean(0), x.std(0).clamp_min(1e-9)
    h = (x - mean) / std
    proj = None
    if opts.nuisance and controls:
        scaled = [(m - mean) / std for m in mats[: 1 + len(controls)]]  # clean, then one per control
        shifted = by_family(scaled[1:], controls, families, opts) if opts.nuisance_families else scaled[1:]
        proj = nuisance_projection([scaled[0], *shifted])
    offset = torch.cat(
        [torch.full((len(m),), opts.control_margin if 0 < i <= len(controls) else 0.0, dtype=torch.float64) for i, m in enumerate(mats)]
    )
    weights = _fit(h @ proj if proj is not None else h, y, w / w.sum(), opts, offset)
    return LearnedDetector(opts.spec, tuple(names), mu, sd, mean, std, weights | ({"proj": proj} if proj is not None else {}))


def nuisance_projection(groups: list[torch.Tensor]) -> torch.Tensor:
    """P = I − QQᵀ (F, F), Q an orthonormal basis of the directions from the clean images' mean to each
    control's mean (standardised features; groups[0] clean, the rest one control each): a model that
    reads P h is blind, to first order, to what the benign corruptions change."""
    clean = groups[0].mean(0)
    d = torch.stack([g.mean(0) - clean for g in groups[1:] if len(g)], 1)  # (F, C)
    q, _ = torch.linalg.qr(d)
    return torch.eye(len(clean), dtype=d.dtype) - q @ q.T


def _fit(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, opts: Options, offset: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weighted logistic loss of logit + offset, + l2, by L-BFGS (linear) or Adam then L-BFGS (mlp); float64, seeded."""
    gen = torch.Generator().manual_seed(opts.seed)
    f = x.shape[1]
    if opts.kind == "mlp":
        params = {
            "w1": (torch.randn(opts.hidden, f, generator=gen, dtype=torch.float64) / f**0.5).requires_grad_(),
            "b1": torch.zeros(opts.hidden, dtype=torch.float64, requires_grad=True),
            "w2": (torch.randn(opts.hidden, generator=gen, dtype=torch.float64) / opts.hidden**0.5).requires_grad_(),
            "b2": torch.zeros((), dtype=torch.float64, requires_grad=True),
        }
    else:
        params = {
            "w": torch.zeros(f, dtype=torch.float64, requires_grad=True),
            "b": torch.zeros((), dtype=torch.float64, requires_grad=True),
        }

    def logit(p: dict[str, torch.Tensor]) -> torch.Tensor:
        if opts.kind == "mlp":
            return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"] + p["b2"]
        return x @ p["w"] + p["b"]

    def loss() -> torch.Tensor:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit(params) + offset, y, weight=w, reduction="sum")
        return bce + opts.l2 * sum((v * v).sum() for k, v in params.items() if k.startswith("w"))  # type: ignore[return-value]

    if opts.kind == "mlp":
        adam = torch.optim.Adam(params.values(), lr=1e-2)
        for _ in range(500):
            adam.zero_grad()
            loss().backward()  # type: ignore[no-untyped-call]
            adam.step()
    lbfgs = torch.optim.LBFGS(
        params.values(), lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        value = loss()
        value.backward()  # type: ignore[no-untyped-call]
        return value

    lbfgs.step(closure)  # type: ignore[no-untyped-call]
    return {k: v.detach() for k, v in params.items()}


def measure(detector: LearnedDetector, clean_b: Table, adv_b: Table) -> dict[str, float]:
    """AUC and TPR at α against the clean part-B scores (conformal p-values), for one attack on part B."""
    s_clean = detector.logit(raw(clean_b)).numpy()
    s_adv = detector.logit(raw(adv_b)).numpy()
    p = conformal_p_value(np.sort(s_clean), s_adv, "high")
    return {"n": len(s_adv), "auc": roc_auc(s_clean, s_adv) if len(s_adv) else float("nan")} | {
        f"tpr@{a}": float((p <= a).mean()) if len(p) else float("nan") for a in ALPHAS
    }


@dataclass
class Collected:
    """Everything the training reads: feature tables of parts A and B, which specs are attacks and which
    controls, their families, the Roth statistics of clean part A, the input columns, the data."""

    sets: dict[str, Sets]
    attacks: list[str]
    controls: list[str]
    families: dict[str, str]
    stats: tuple[np.ndarray, np.ndarray]
    names: list[str]
    parts: dict[str, Dataset]


def collect(
    bundle: Bundle,
    data: Path,
    attack_specs: Sequence[str],
    control_specs: Sequence[str],
    spec: FeatureSpec,
    limit: int = 500,
    validate_limit: int = 300,
    cache: Path | None = None,
    log: Any = print,
) -> Collected:
    """Attacks and controls on seeded subsets of parts A (`limit` images) and B (`validate_limit`), and
    every image's features (cached)."""
    t0 = time.time()
    parts = {p: correct(bundle, load_dataset(data, f"calibration-{p}", bundle.classes, bundle.input)) for p in ("a", "b")}
    specs = [parse_attack(s, bundle) for s in (*attack_specs, *control_specs)]
    bad = [s.name for s in specs[: len(attack_specs)] if s.control] + [s.name for s in specs[len(attack_specs) :] if not s.control]
    if bad:
        raise ValueError(f"{bad}: attacks go in --attacks, benign controls in --controls")
    sets = {}
    for p, d in parts.items():
        n = limit if p == "a" else validate_limit
        sets[p] = Sets(cached_features(bundle, d.x, spec, cache, clean_key(bundle, d)))
        for attack in specs:
            x, y, key = attacked(bundle, d, attack, n, cache)
            empty = {c: np.zeros((0, *v.shape[1:])) for c, v in sets[p].clean.items()}  # no successful image
            # the key names the starting images, not what an attack that is not kept (the adaptive one) made of them
            feature_cache = cache if attack_cache.kept(attack) else None
            sets[p].adv[attack.name] = cached_features(bundle, x, spec, feature_cache, key) if len(x) else empty
            if attack.control:
                sets[p].right[attack.name] = sets[p].adv[attack.name]["predicted"] == y.numpy()
            log(f"part {p.upper()} {attack.name}: {len(x)} images ({time.time() - t0:.0f} s)")
    k = int(bundle.model(parts["a"].x[:1].to(device_of(bundle.model))).shape[1])
    return Collected(
        sets,
        [s.name for s in specs if not s.control],
        [s.name for s in specs if s.control],
        {s.name: s.family for s in specs},
        shift_stats(sets["a"].clean, k),
        columns(sets["a"].clean),
        parts,
    )


def kept_columns(names: Sequence[str], opts: Options) -> list[str]:
    """The detector's input columns: names less the groups and columns `opts.without` leaves out."""
    return [n for n in names if group(n) not in opts.without and n.split("/")[0] not in opts.without]


def fit(c: Collected, opts: Options) -> tuple[LearnedDetector, dict[str, Any]]:
    """The detector trained on every training attack, and the report: per spec its part-B row when
    trained on everything (seen) and without its family (leave one family out)."""
    a, b = c.sets["a"], c.sets["b"]
    names = kept_columns(c.names, opts)
    detector = train(a, c.attacks, c.controls, opts, names, c.stats, c.families)
    rows: dict[str, Any] = {}
    for name in c.attacks + c.controls:
        rows[name] = {"family": c.families[name], "control": name in c.controls, "seen": measure(detector, b.clean, b.adv[name])}
        if name in c.controls:  # its false alarms: among the changed images the classifier still reads right
            rows[name]["still_right"] = measure(detector, b.clean, still_right(b, name))
    for family in sorted({c.families[x] for x in c.attacks}):
        without = train(a, [x for x in c.attacks if c.families[x] != family], c.controls, opts, names, c.stats, c.families)
        for name in (x for x in c.attacks if c.families[x] == family):
            rows[name]["left_out"] = measure(without, b.clean, b.adv[name])
    detector.meta = {
        "data": {"description": c.parts["a"].description, "sha256": c.parts["a"].sha256, "split": "calibration-a"},
        "attacks": c.attacks,
        "controls": c.controls,
        "families": sorted({c.families[x] for x in c.attacks}),
        "control_families": sorted({c.families[x] for x in c.controls}),
        "options": {
            "kind": opts.kind,
            "hidden": opts.hidden,
            "l2": opts.l2,
            "control_weight": opts.control_weight,
            "control_margin": opts.control_margin,
            "nuisance": opts.nuisance,
            "nuisance_families": list(opts.nuisance_families),
            "control_negatives": opts.control_negatives,
            "seed": opts.seed,
            "without": list(opts.without),
        },
        "n_clean": len(c.parts["a"].y),
    }
    return detector, {"detector": detector.meta | {"columns": names}, "clean_b": len(c.parts["b"].y), "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    d = report["detector"]
    lines = [
        f"# Learned detector ({d['options']['kind']}, {len(d['columns'])} features)",
        "",
        f"Trained on part A ({d['n_clean']} clean images) with attacks {', '.join(d['attacks'])} and controls {', '.join(d['controls'])}; "
        f"measured on part B ({report['clean_b']} clean images set the thresholds). Each cell: AUC / TPR@0.05 / TPR@0.01; "
        "a control's second cell: the same among its changed images the classifier still reads right (n), its false alarms. "
        f"Controls' negatives: {d['options'].get('control_negatives', 'all')} of their images.",
        "",
        "| spec | family | n | trained on everything | trained without its family |",
        "|---|---|---|---|---|",
    ]
    fmt = lambda r: f"{r['auc']:.3f} / {r['tpr@0.05']:.3f} / {r['tpr@0.01']:.3f}" if r else "—"  # noqa: E731
    for name, r in report["rows"].items():
        second = f"still read right ({r['still_right']['n']}): {fmt(r['still_right'])}" if "still_right" in r else fmt(r.get("left_out"))
        lines.append(f"| {name}{' (control)' if r['control'] else ''} | {r['family']} | {r['seen']['n']} | {fmt(r['seen'])} | {second} |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "detector.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "detector.md").write_text(markdown(report))
