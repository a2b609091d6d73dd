"""The learned detector's features against their definitions, its model, file and training
(docs/detection.md#learned-detector)."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.baselines import Mahalanobis
from service.core.bundle import Bundle, load_bundle
from service.core.features import FeatureSpec, extract, group
from service.core.learned import LearnedDetector
from service.core.transforms import median_2x2
from service.fisher import compute
from service.fisher.noise import seeded_noise
from service.fisher.profile import profile
from service.lab import learn
from tests.small_models import make

SPEC = FeatureSpec(0.05, 4, ("median2", "bits4"))


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("name", ["bncnn", "air"])
def test_the_columns_are_what_their_definitions_say(name: str) -> None:
    model, shape = make(name)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(8))
    gen = torch.Generator().manual_seed(9)
    fit = Mahalanobis.fit(model, torch.rand(40, *shape, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    raw = extract(model, x, SPEC, fit)
    r = compute(model, x, ["margin", "entropy", "sensitivity"])
    for col, want in (
        ("margin", r.scores["margin"]),
        ("entropy", r.scores["entropy"]),
        ("log_sensitivity", r.scores["sensitivity"].log10()),
    ):
        torch.testing.assert_close(raw.columns[col], want, rtol=1e-4, atol=1e-6)
    pr = profile(model, x)
    torch.testing.assert_close(raw.columns["log_param_total"], pr.log_totals()[:, 0], rtol=1e-4, atol=1e-6)
    shares = pr.log_shares()
    for i, layer in enumerate(pr.layers):
        torch.testing.assert_close(raw.columns[f"param_share/{layer}"], shares[:, i], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(raw.columns[f"feature_share/{layer}"], shares[:, len(pr.layers) + i], rtol=1e-3, atol=1e-5)
    with torch.no_grad():
        lp = torch.log_softmax(model(x).double(), 1)
        lq = torch.log_softmax(model(median_2x2(x)).double(), 1)
        eta = seeded_noise(x, 2)  # the antithetic pairs: x ± σ η_j
        noisy = [torch.log_softmax(model((x + sign * 0.05 * eta[:, j]).clamp(0, 1)).double(), 1) for j in range(2) for sign in (1, -1)]
    torch.testing.assert_close(raw.columns["squeeze_kl/median2"], _kl(lp, lq).clamp_min(1e-30).log10(), rtol=1e-3, atol=1e-5)
    residual = torch.stack([((xi - median_2x2(xi[None])[0]).double() ** 2).mean() for xi in x]).log10()  # log10 mean((x − T x)²)
    torch.testing.assert_close(raw.columns["residual/median2"], residual, rtol=1e-6, atol=1e-9)
    kl = torch.stack([_kl(lp, q) for q in noisy]).mean(0)
    torch.testing.assert_close(raw.columns["noise_kl"], kl.clamp_min(1e-30).log10(), rtol=1e-3, atol=1e-5)
    y = lp.argmax(1)
    with torch.no_grad():
        z = model(x).double()
        zq = torch.stack([model((x + sign * 0.05 * eta[:, j]).clamp(0, 1)).double() for j in range(2) for sign in (1, -1)])
    shift = (zq - zq.gather(2, y[None, :, None].expand(4, -1, 1))).mean(0) - (z - z.gather(1, y[:, None]))
    torch.testing.assert_close(raw.shift, shift, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw.columns["log_mahalanobis"], fit.score(model, x).log10(), rtol=1e-6, atol=1e-9)


def test_the_columns_are_differentiable_in_x() -> None:
    model, shape = make("bncnn")
    model = model.double()
    x = torch.rand(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10), requires_grad=True)
    spec = FeatureSpec(0.3, 2, ("median2",))  # a KL of ~1e-8 (σ 0.05 here) is below what finite differences resolve
    eta = seeded_noise(x.detach().float(), 1).double()  # the draw the served value takes, held fixed

    def f(t: torch.Tensor) -> torch.Tensor:
        raw = extract(model, t, spec, None, grad=True, eta=eta)
        return torch.stack([raw.columns[c] for c in ("log_sensitivity", "log_param_total", "squeeze_kl/median2", "noise_kl")]).sum(
            0
        ) + raw.shift.sum(1)

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True, atol=1e-5, rtol=1e-3)
    same = extract(model, x.detach(), spec, None)
    torch.testing.assert_close(
        extract(model, x, spec, None, grad=True).columns["noise_kl"].detach(), same.columns["noise_kl"], rtol=1e-4, atol=1e-5
    )


def _detector(kind: str) -> LearnedDetector:
    gen = torch.Generator().manual_seed(11)
    names = ("margin", "entropy", "noise_shift")
    weights = (
        {
            "w1": torch.randn(5, 3, generator=gen, dtype=torch.float64),
            "b1": torch.randn(5, generator=gen, dtype=torch.float64),
            "w2": torch.randn(5, generator=gen, dtype=torch.float64),
            "b2": torch.tensor(0.3, dtype=torch.float64),
        }
        if kind == "mlp"
        else {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), "b": torch.tensor(-0.25, dtype=torch.float64)}
    )
    k = 4
    return LearnedDetector(
        SPEC,
        names,
        torch.randn(k, k, generator=gen, dtype=torch.float64),
        torch.rand(k, k, generator=gen, dtype=torch.float64) + 0.5,
        torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64),
        torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64),
        weights,
    )


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_model_computes_its_formula_and_survives_its_file(kind: str, tmp_path: Path) -> None:
    det = _detector(kind)
    gen = torch.Generator().manual_seed(12)
    table = {
        "margin": np.array([1.0, -2.0, 3.0]),
        "entropy": np.array([0.1, 0.9, 0.5]),
        "shift": torch.randn(3, 4, generator=gen, dtype=torch.float64).numpy(),
        "predicted": np.array([0, 2, 3]),
    }
    raw = learn.raw(table)
    y = raw.predicted
    z = (raw.shift - det.shift_mean[y]) / det.shift_std[y]
    z[torch.arange(3), y] = -torch.inf
    assert torch.equal(det.noise_shift(raw), z.amax(1))
    h = (torch.stack([raw.columns["margin"], raw.columns["entropy"], z.amax(1)], 1) - det.mean) / det.std
    w = det.weights
    want = torch.tanh(h @ w["w1"].T + w["b1"]) @ w["w2"] + w["b2"] if kind == "mlp" else h @ w["w"] + w["b"]
    torch.testing.assert_close(det.logit(raw), want)
    det.meta = {"families": ["pgd_linf"]}
    det.save(tmp_path / "d.safetensors", "ab" * 32)
    back, sha = LearnedDetector.load(tmp_path / "d.safetensors")
    assert sha == "ab" * 32 and back.kind == kind and back.names == det.names and back.spec == det.spec and back.meta == det.meta
    torch.testing.assert_close(back.logit(raw), det.logit(raw))


def _table(rng: np.random.Generator, n: int, dm: float, de: float) -> learn.Table:
    """n synthetic rows: `margin` ~ N(dm, 1), `entropy` ~ N(de, 1), noise shifts (n, 3), predicted classes of 3."""
    return {
        "margin": rng.normal(dm, 1, n),
        "entropy": rng.normal(de, 1, n),
        "shift": rng.normal(0, 1, (n, 3)),
        "predicted": rng.integers(0, 3, n),
    }


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_training_separates_what_can_be_separated_and_keeps_controls_down(kind: str) -> None:
    """Synthetic columns: the attacks are shifted in `margin` and `entropy`, a control in `entropy` as far:
    weighted far above the clean images together, the control teaches the model to ignore entropy;
    without it, the model flags the control too."""
    rng = np.random.default_rng(0)
    table = lambda n, dm, de: _table(rng, n, dm, de)  # noqa: E731

    a = learn.Sets(table(600, 0, 0), {"pgd": table(300, 3, 3), "noise": table(300, 0, 3)})
    names = ["margin", "entropy", "noise_shift"]
    stats = learn.shift_stats(a.clean, 3)
    b_clean, b_pgd, b_noise = table(2000, 0, 0), table(500, 3, 3), table(500, 0, 3)
    det = learn.train(a, ["pgd"], ["noise"], learn.Options(SPEC, kind=kind, hidden=4, control_weight=30, l2=1e-5), names, stats)
    assert learn.measure(det, b_clean, b_pgd)["tpr@0.05"] > 0.8
    assert learn.measure(det, b_clean, b_noise)["tpr@0.05"] < 0.12
    blind = learn.train(a, ["pgd"], ["noise"], learn.Options(SPEC, kind=kind, hidden=4, control_weight=0), names, stats)
    assert learn.measure(blind, b_clean, b_noise)["tpr@0.05"] > 0.5
    projected = learn.train(a, ["pgd"], ["noise"], learn.Options(SPEC, kind=kind, hidden=4, control_weight=0, nuisance=True), names, stats)
    assert learn.measure(projected, b_clean, b_pgd)["tpr@0.05"] > 0.8 and learn.measure(projected, b_clean, b_noise)["tpr@0.05"] < 0.08
    d = projected.matrix(learn.raw(a.adv["noise"])).mean(0) - projected.matrix(learn.raw(a.clean)).mean(0)  # the control's shift
    assert float((d @ projected.weights["proj"]).norm()) < 1e-9 * float(d.norm())  # blind to it by construction


def test_still_right_negatives_leave_the_misread_control_images_out() -> None:
    """A control whose misread half looks like the attack: with every image among the negatives the model
    learns to call the attack clean (logit < 0); with `control_negatives="still-right"` it is trained
    exactly as if the misread rows were not there, and calls it an attack."""
    rng = np.random.default_rng(2)
    table = lambda n, dm, de: _table(rng, n, dm, de)  # noqa: E731

    read_right, misread = table(300, 0, 0.5), table(300, 3, 3)
    control = {k: np.concatenate([read_right[k], misread[k]]) for k in read_right}
    right = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    a = learn.Sets(table(600, 0, 0), {"pgd": table(300, 3, 3), "noise": control}, {"noise": right})
    names, stats = ["margin", "entropy", "noise_shift"], learn.shift_stats(a.clean, 3)
    opts = learn.Options(SPEC, control_weight=10, l2=1e-5)
    kept = learn.train(a, ["pgd"], ["noise"], dataclasses.replace(opts, control_negatives="still-right"), names, stats)
    alone = learn.train(learn.Sets(a.clean, {"pgd": a.adv["pgd"], "noise": read_right}), ["pgd"], ["noise"], opts, names, stats)
    every = learn.train(a, ["pgd"], ["noise"], opts, names, stats)
    assert all(torch.equal(kept.weights[k], alone.weights[k]) for k in alone.weights)
    b_pgd = learn.raw(table(500, 3, 3))
    assert float(kept.logit(b_pgd).mean()) > 0 > float(every.logit(b_pgd).mean())
    assert learn.still_right(a, "noise")["margin"].shape == (300,)
    with pytest.raises(ValueError, match="still reads right"):
        learn.still_right(learn.Sets(a.clean, a.adv), "noise")
    with pytest.raises(ValueError, match="expected 'all' or 'still-right'"):
        learn.Options(SPEC, control_negatives="misread")


def test_nuisance_families_project_one_pooled_direction_per_family() -> None:
    """Two noise strengths and a JPEG control: per control, three directions are projected out; with
    `nuisance_families=("noise",)` one, the two noise specs' rows pooled, and the JPEG shift stays readable."""
    rng = np.random.default_rng(1)
    table = lambda n, dm, de: _table(rng, n, dm, de)  # noqa: E731

    adv = {"pgd": table(300, 3, 3), "noise:0.05": table(300, 0, 2), "noise:0.1": table(300, 0, 4), "jpeg:50": table(300, 2, 0)}
    a = learn.Sets(table(600, 0, 0), adv)
    names, stats = ["margin", "entropy", "noise_shift"], learn.shift_stats(a.clean, 3)
    controls = ["noise:0.05", "noise:0.1", "jpeg:50"]
    families = {"noise:0.05": "noise", "noise:0.1": "noise", "jpeg:50": "jpeg"}
    per_control = learn.train(a, ["pgd"], controls, learn.Options(SPEC, nuisance=True), names, stats, families)
    pooled = learn.train(a, ["pgd"], controls, learn.Options(SPEC, nuisance=True, nuisance_families=("noise",)), names, stats, families)
    rank = lambda p: int(torch.linalg.matrix_rank(torch.eye(3, dtype=p.dtype) - p))  # noqa: E731
    assert rank(per_control.weights["proj"]) == 3 and rank(pooled.weights["proj"]) == 1
    noise = torch.cat([pooled.matrix(learn.raw(a.adv[c])) for c in controls[:2]]).mean(0) - pooled.matrix(learn.raw(a.clean)).mean(0)
    assert float((noise @ pooled.weights["proj"]).norm()) < 1e-9 * float(noise.norm())
    jpeg = pooled.matrix(learn.raw(a.adv["jpeg:50"])).mean(0) - pooled.matrix(learn.raw(a.clean)).mean(0)
    assert float((jpeg @ pooled.weights["proj"]).norm()) > 0.5 * float(jpeg.norm())
    with pytest.raises(ValueError, match="not among the controls' families"):
        learn.train(a, ["pgd"], controls, learn.Options(SPEC, nuisance=True, nuisance_families=("blur",)), names, stats, families)
    with pytest.raises(ValueError, match="without nuisance"):
        learn.Options(SPEC, nuisance_families=("noise",))


@pytest.mark.slow
def test_fit_detector_end_to_end_and_calibrate_on_part_b(tmp_path: Path, mnist: Bundle) -> None:
    """fit-detector on 96 fixture digits (parts A and B of 24), then calibrate on part B (part A is
    refused), serve the score and see it in the bundle's scores."""
    from service.cli import main
    from tests.conftest import FIXTURES

    f = np.load(FIXTURES / "mnist_eval512.npz")
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_test=f["x"][:96], y_test=f["y"][:96], x_train=f["x"], y_train=f["y"])
    dst = tmp_path / "b"
    shutil.copytree(mnist.path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    args = ["fit-detector", "--model", str(dst), "--data", str(npz), "--attacks", "pgd_linf:0.3:5,fgsm:0.3", "--controls", "noise:0.1"]
    args += [
        "--limit",
        "12",
        "--validate-limit",
        "12",
        "--sigma",
        "0.1",
        "--squeezers",
        "bits1,median2",
        "--report",
        str(tmp_path / "r"),
        "--cache",
        str(tmp_path / "c"),
    ]
    assert main(args) == 0
    rows = __import__("json").loads((tmp_path / "r" / "detector.json").read_text())["rows"]
    assert rows["pgd_linf:0.3:5"]["seen"]["auc"] > 0.8 and "left_out" in rows["fgsm:0.3"]
    # the ablation: the same run without the Fisher features (the cache makes it cheap), to its own file
    ablated = [*args, "--without", "fisher", "--out", str(tmp_path / "nf.safetensors")]
    ablated[ablated.index(str(tmp_path / "r"))] = str(tmp_path / "r2")
    assert main(ablated) == 0
    columns = __import__("json").loads((tmp_path / "r2" / "detector.json").read_text())["detector"]["columns"]
    assert columns and {group(c) for c in columns} == {"predictive", "squeezing", "mahalanobis"}
    assert main([*ablated, "--without", "nope"]) == 2
    bundle = load_bundle(dst)
    assert bundle.detector is not None and {"learned", "fisher_noise_shift"} <= set(bundle.scores)
    cal = ["calibrate", "--model", str(dst), "--data", str(npz), "--statistic", "learned", "--tail", "one-sided"]
    assert main([*cal, "--split", "calibration"]) == 2
    assert main([*cal, "--split", "calibration-b"]) == 0
    served = load_bundle(dst)
    assert served.calibration is not None and served.calibration.statistic == "learned" and "learned" in served.calibration.values


def test_a_request_for_the_shipped_scores_runs_the_copies_and_the_features_once(mnist: Bundle) -> None:
    """A request for the squeeze drop (the shipped MNIST decision's, beside the detector), Mahalanobis and
    the detector: the first is read from the copies the detector's features already ran, the second from
    the penultimate features its forward already recorded, and each equals the baseline computed on its own."""
    from service.core.baselines import feature_squeezing
    from service.core.scoring import score

    assert mnist.detector is not None and mnist.mahalanobis is not None and {"bits1", "median2"} <= set(mnist.detector.spec.squeezers)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    calls: list[int] = []
    hook = mnist.model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        shared = score(mnist, x, ("feature_squeezing", "squeeze_drop", "mahalanobis", "learned")).raw
    finally:
        hook.remove()
    spec = mnist.detector.spec
    assert calls == [6] * (1 + len(spec.squeezers) + spec.draws)  # the image, then each copy once: nothing more
    torch.testing.assert_close(shared["feature_squeezing"], feature_squeezing(mnist.model, x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shared["squeeze_drop"], score(mnist, x, ("squeeze_drop",)).raw["squeeze_drop"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shared["mahalanobis"], mnist.mahalanobis.score(mnist.model, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_every_shipped_detector_column_has_a_group(name: str) -> None:
    """`--without GROUP` ablations and bench/detector_weights.py read the groups: none may be missed."""
    detector = load_bundle(name).detector
    assert detector is not None
    groups = [group(c) for c in detector.names]
    assert groups.count("fisher") >= 17 and set(groups) == {"predictive", "fisher", "squeezing", "mahalanobis"}
    with pytest.raises(ValueError, match="belongs to no group"):
        group("novel_column")


def test_detector_options_parse_and_rank() -> None:
    """bench/detector_options.py: a configuration's words become learn.Options; acceptable configurations
    rank first by mean TPR, the rest by their worst control's excess over α."""
    from bench import detector_options as do

    o = do.options("mlp cw=10 margin=8 nuisance=noise+gnoise without=residual", SPEC)
    assert (o.kind, o.hidden, o.control_weight, o.control_margin, o.nuisance) == ("mlp", 64, 10.0, 8.0, True)
    assert o.nuisance_families == ("noise", "gnoise") and o.without == ("residual",)
    assert do.options("linear cw=3 nuisance=all", SPEC).nuisance_families == () and do.options("linear", SPEC).nuisance is False
    assert do.options("linear negatives=still-right", SPEC).control_negatives == "still-right"
    assert do.options("linear", SPEC).control_negatives == "all"
    # the bound widens with fewer images still read right: 3 of 39 passes at α = 0.05, 2 of 39 fails at 0.01
    assert do.over_bound(3 / 39, 39, 0.05) < 0 < do.over_bound(2 / 39, 39, 0.01)
    assert do.over_bound(0.08, 200, 0.05) < 0 < do.over_bound(0.085, 200, 0.05)
    for bad in ("svm cw=3", "mlp weight=3"):
        with pytest.raises(ValueError, match="bad configuration"):
            do.options(bad, SPEC)
    rows = [
        {"acceptable": False, "control_excess": 0.04, "mean_tpr": 0.99},
        {"acceptable": True, "control_excess": 0.02, "mean_tpr": 0.70},
        {"acceptable": False, "control_excess": 0.10, "mean_tpr": 0.999},
        {"acceptable": True, "control_excess": 0.03, "mean_tpr": 0.80},
    ]
    assert [r["mean_tpr"] for r in sorted(rows, key=do.rank)] == [0.80, 0.70, 0.99, 0.999]
    # the goal's line α + 0.015, a rate exactly on it (5 of 200 at α = 0.01) not over it
    flags = {"still_right": {"noise": {"tpr@0.05": 0.066, "tpr@0.01": 0.025}, "jpeg": {"tpr@0.05": 0.065, "tpr@0.01": 0.03}}}
    assert (do.over_line(flags, 0.05), do.over_line(flags, 0.01)) == (1, 1)


def test_collect_keeps_features_only_of_images_the_cache_keeps(tmp_path: Path, mnist: Bundle) -> None:
    """fit-detector's features are kept under the key of the images they were read from: for the
    adaptive attack, whose images are made afresh against each decision, nothing is kept (a second
    detector would otherwise read the first one's adaptive images' features)."""
    f = np.load(Path(__file__).parent / "fixtures" / "mnist_eval512.npz")
    data = tmp_path / "digits.npz"
    np.savez(data, x_test=f["x"], y_test=f["y"])
    cache = tmp_path / "cache"
    c = learn.collect(
        mnist, data, ["pgd_linf:0.3", "adaptive:0.3"], ["noise:0.1"], SPEC, limit=3, validate_limit=3, cache=cache, log=lambda m: None
    )
    assert all(len(c.sets[p].adv[a]["margin"]) for p in "ab" for a in ("pgd_linf:0.3", "adaptive:0.3"))  # every attack made images
    kept = sorted(p.name.split("-")[0] for p in cache.iterdir())
    assert kept == ["features"] * 6 + ["noise_0.1"] * 2 + ["pgd_linf_0.3"] * 2  # per part: clean, pgd, noise; no adaptive
    again = learn.collect(mnist, data, ["pgd_linf:0.3"], ["noise:0.1"], SPEC, limit=3, validate_limit=3, cache=cache, log=lambda m: None)
    np.testing.assert_array_equal(again.sets["b"].adv["pgd_linf:0.3"]["margin"], c.sets["b"].adv["pgd_linf:0.3"]["margin"])
