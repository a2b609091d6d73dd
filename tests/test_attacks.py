"""Attacks, controls, baselines and the evaluation harness, on the shipped MNIST model and fixtures."""

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import redecide
from service.bundle import Bundle
from service.cli import main
from service.core.baselines import Mahalanobis, feature_squeezing
from service.core.calibration import Component
from service.core.scoring import score_dataset
from service.fisher.input_fisher import top_eigenpair
from service.lab import adaptive, attacks
from service.lab.attack_specs import parse_attack
from service.lab.stats import rate_interval, roc_auc
from tests import small_models
from tests.conftest import FIXTURES


def _success(model, x, y, adv) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return float((model(attacks.quantise(adv)).argmax(1) != y).float().mean())


def test_pgd_linf_at_eps_03_fools_the_undefended_model(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    adv = attacks.pgd_linf(mnist.model, x, y, 0.3)
    assert _success(mnist.model, x, y, adv) == 1.0
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6


def test_pgd_l2_stays_in_its_ball(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    adv = attacks.pgd_l2(mnist.model, x, y, 3.0)
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 3.0 + 1e-4
    assert _success(mnist.model, x, y, adv) >= 0.9


@pytest.mark.parametrize("kappa", [0.0, 20.0])
def test_cw_reaches_its_confidence(mnist: Bundle, digits, kappa: float) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    adv = attacks.cw_l2(mnist.model, x[:6], y[:6], kappa=kappa, steps=60, search=4)
    with torch.no_grad():
        z = mnist.model(adv)
    margin = z.gather(1, y[:6, None]).squeeze(1) - z.scatter(1, y[:6, None], float("-inf")).amax(1)
    assert (margin <= -kappa + 1e-4).all()


def test_deepfool_crosses_the_boundary_with_a_small_step(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    adv = attacks.deepfool(mnist.model, x, y)
    with torch.no_grad():
        assert bool((mnist.model(adv).argmax(1) != y).all())  # it stops just past the boundary: 8-bit rounding undoes some
    assert float((adv - x).flatten(1).norm(dim=1).median()) < float(
        attacks.pgd_l2(mnist.model, x, y, 3.0).sub(x).flatten(1).norm(dim=1).median()
    )


def test_square_uses_only_queries_and_respects_eps(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits

    class NoGrad(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            assert not torch.is_grad_enabled(), "Square is a black-box attack"
            return mnist.model(t)

    adv = attacks.square_linf(NoGrad(), x, y, 0.3, queries=300)
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6 and _success(mnist.model, x, y, adv) >= 0.5


def test_ossa_steps_along_the_top_eigenvector(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    adv = attacks.ossa(mnist.model, x, y, 2.0)
    _, u = top_eigenpair(mnist.model, x)
    d = (adv - x).flatten(1)
    cos = (d * u.flatten(1)).sum(1).abs() / d.norm(dim=1)
    assert (cos > 0.8).float().mean() >= 0.75  # the clip to [0, 1] bends a few


def test_adaptive_attack_works_against_the_whole_combined_decision(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    """mnist's decision combines feature squeezing and the learned detector: the adaptive attack (asking
    for a logit margin of 10) differentiates both and pulls the decision's penalty (the largest
    excess over a component's clean α-boundary) far below plain PGD's at the same budget, while its
    digits stay misclassified. How often it gets all the way under the thresholds is a measurement
    (docs/detection.md#adaptive-attacks), not a test."""
    x, y = digits
    x, y = x[:8], y[:8]
    cal = mnist.calibration
    assert cal is not None and cal.combination is not None
    penalty = adaptive.decision_penalty(
        adaptive.targets(cal.values, cal.combination.components, mnist.mahalanobis, detector=mnist.detector)
    )
    plain = attacks.quantise(attacks.pgd_linf(mnist.model, x, y, 0.3, steps=20))
    adaptive_adv = attacks.quantise(parse_attack("adaptive_l2:3:10", mnist).run(mnist.model, x, y))
    with torch.no_grad():
        p_plain, p_adaptive = penalty(mnist.model, plain), penalty(mnist.model, adaptive_adv)
    assert float(p_adaptive.median()) < 0.8 * float(p_plain.median()), (p_plain, p_adaptive)
    assert _success(mnist.model, x, y, adaptive_adv) >= 0.75


def test_adaptive_penalty_is_zero_inside_and_grows_outside_the_clean_range() -> None:
    values = {"fisher_input_trace": np.linspace(-3.0, -1.0, 401)}  # median −2; 2.5%/97.5% at −2.95/−1.05
    (target,) = adaptive.targets(values, [Component("fisher_input_trace", "two-sided")], None)
    assert target.center == pytest.approx(-2.0) and target.low == pytest.approx(-2.95) and target.high == pytest.approx(-1.05)
    z = target.excess(torch.tensor([-2.0, -1.525, -1.05, -2.95, -4.85]))
    assert torch.allclose(z, torch.tensor([0.0, 0.5, 1.0, 1.0, 3.0]), atol=1e-6)
    values["feature_squeezing"] = np.linspace(0.0, 1.0, 101)  # one-sided, "high": only the upper tail counts
    (fs,) = adaptive.targets(values, [Component("feature_squeezing", "one-sided")], None)
    assert fs.low == -np.inf and fs.high == pytest.approx(0.95)
    assert torch.allclose(fs.excess(torch.tensor([0.0, 0.5, 0.95])), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="cannot differentiate 'fisher_form'"):
        adaptive.targets({"fisher_form": np.ones(3)}, [Component("fisher_form", "one-sided")], None)


@pytest.mark.parametrize(
    "score",
    [
        "confidence",
        "entropy",
        "margin",
        "sensitivity",
        "fisher_input_trace",
        "fisher_param_trace",
        "feature_squeezing",
        "squeeze_drop",
        "fisher_noise_kl",
        "mahalanobis",
        "mahalanobis_layers",
    ],
)
def test_adaptive_surrogates_equal_the_served_scores(mnist: Bundle, digits, score: str) -> None:  # type: ignore[no-untyped-def]
    """What the attacker differentiates is the score the decision reads (thresholded form), on real digits."""
    x, _ = digits
    x = x[:6].clone().requires_grad_(True)
    with torch.enable_grad():
        surrogate = adaptive.surrogates(mnist.mahalanobis)[score](mnist.model, x)
    served, _ = score_dataset(mnist, x.detach(), [score], opts={})  # thresholded form
    assert np.allclose(surrogate.detach().double().numpy(), served[score], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["bncnn", "resnet"])
def test_param_trace_surrogate_is_differentiable_in_x(name: str) -> None:
    """The torch.func stand-in for tr F_θ: its x-gradient matches finite differences (float64), and
    under the softplus ReLU surrogate (inside vmap) it stays finite and nonzero."""
    model, shape = small_models.make(name)
    model = model.double()
    x = torch.rand(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: adaptive.log10_param_trace(model, t), (x,), fast_mode=True)
    with adaptive.relu_surrogate(beta=10.0):
        (g,) = torch.autograd.grad(adaptive.log10_param_trace(model, x).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_surrogate_relu_keeps_second_derivatives() -> None:
    x = torch.linspace(-2, 2, 9, requires_grad=True)
    with adaptive.relu_surrogate(beta=5.0):
        (g,) = torch.autograd.grad(torch.relu(x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.allclose(g, torch.sigmoid(5 * x.detach())) and (h > 0).all()
    assert torch.equal(torch.relu(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))  # restored


def test_controls_and_parse(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    noise = parse_attack("noise:8/255", mnist)
    assert noise.control and float((noise.run(mnist.model, x, y) - x).abs().max()) <= 8 / 255 + 1e-6
    jpeg = parse_attack("jpeg:50", mnist).run(mnist.model, x, y)
    assert jpeg.shape == x.shape and 0 < float((jpeg - x).abs().mean()) < 0.1
    with pytest.raises(ValueError, match="known: fgsm:EPS"):
        parse_attack("nope:1")
    assert parse_attack("adaptive_l2:3:10", mnist).name == "adaptive_l2:3:10"
    with pytest.raises(ValueError, match="adaptive takes EPS"):
        parse_attack("adaptive:0.3:1:2", mnist)
    for bad in ("adaptive:x", "pgd_linf:eight"):
        with pytest.raises(ValueError, match="is not a number"):
            parse_attack(bad, mnist)
    with pytest.raises(ValueError, match="needs a calibrated bundle"):
        parse_attack("adaptive:0.3")
    with pytest.raises(ValueError, match="pgd_linf needs EPS"):
        parse_attack("pgd_linf")
    with pytest.raises(ValueError, match="deepfool takes overshoot:steps"):
        parse_attack("deepfool:0.1:5:9")
    for spec, family, control in (("deepfool", "deepfool", False), ("art_apgd:8/255:dlr", "art_apgd", False), ("blur:0.7", "blur", True)):
        a = parse_attack(spec)
        assert (a.family, a.control) == (family, control), spec


def test_the_parameters_of_a_spec_reach_the_attack(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    """One step of PGD moves less than forty; a larger DeepFool overshoot moves further."""
    x, y = digits
    one, forty = (parse_attack(s).run(mnist.model, x, y) for s in ("pgd_linf:0.3:1", "pgd_linf:0.3"))
    assert float((one - x).abs().amax()) <= 0.3 + 1e-6 and _success(mnist.model, x, y, one) < _success(mnist.model, x, y, forty)
    near, far = (parse_attack(s).run(mnist.model, x, y) for s in ("deepfool", "deepfool:0.5"))
    assert float((far - x).flatten(1).norm(dim=1).median()) > 1.1 * float((near - x).flatten(1).norm(dim=1).median())


@pytest.mark.parametrize(
    ("spec", "lo", "hi"),
    [("gnoise:0.05", 0.01, 0.08), ("blur:1", 0.001, 0.2), ("contrast:0.8", 0.005, 0.2), ("brightness:0.05", 0.01, 0.06)],
)
def test_the_benign_controls_change_the_image_a_little(mnist: Bundle, digits, spec: str, lo: float, hi: float) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    out = parse_attack(spec).run(mnist.model, x, y)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and lo < float((out - x).abs().mean()) < hi


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["art_apgd:0.3:ce:20", "art_deepfool", "art_square:0.3:200"])
def test_art_attacks_run_on_the_shipped_model(mnist: Bundle, digits, spec: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("art")
    x, y = digits
    adv = parse_attack(spec).run(mnist.model, x[:6], y[:6])
    assert adv.shape == x[:6].shape and _success(mnist.model, x[:6], y[:6], adv) >= 0.5


def test_art_attacks_are_the_same_on_the_same_images() -> None:
    """ART draws from numpy's global generator: each call is seeded, so a re-run of an evaluation gives
    the same ART rows, and the caller's generator state is left as it was."""
    pytest.importorskip("art")
    from tests.small_models import make

    model, shape = make("bncnn")
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    np.random.seed(123)
    runs = [
        parse_attack(spec).run(model, x, y)
        for spec in ("art_square:0.1:50", "art_square:0.1:50", "art_apgd:0.1:dlr:5", "art_apgd:0.1:dlr:5")
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])
    assert np.random.random() == np.random.RandomState(123).random_sample()  # the caller's stream, untouched


def test_baselines_separate_strong_attacks(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    maha = Mahalanobis.fit(mnist.model, x, y)
    assert maha.penultimate.means.shape[0] == len(torch.unique(y))
    adv = attacks.quantise(attacks.pgd_linf(mnist.model, x, y, 0.3))
    assert roc_auc(maha.score(mnist.model, x).numpy(), maha.score(mnist.model, adv).numpy()) > 0.8
    fs_clean, fs_adv = feature_squeezing(mnist.model, x).numpy(), feature_squeezing(mnist.model, adv).numpy()
    assert roc_auc(fs_clean, fs_adv) > 0.9


def test_roc_auc_counts_ties_as_half() -> None:
    assert roc_auc(np.array([0.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert roc_auc(np.array([0.0]), np.array([0.0])) == 0.5


def _binomial_tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X ≥ k) (upper) or P(X ≤ k) for X ~ Binomial(n, p), 0 < p < 1, summed term by term (each in logs)."""
    terms = range(k, n + 1) if upper else range(0, k + 1)
    log_choose = lambda i: math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)  # noqa: E731
    return sum(math.exp(log_choose(i) + i * math.log(p) + (n - i) * math.log1p(-p)) for i in terms)


def _solve(f: Callable[[float], float], target: float) -> float:
    """The p in [0, 1] with f(p) = target for an f increasing in p, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize(("k", "n"), [(0, 80), (8, 80), (80, 80), (3, 17), (100, 2000)])
def test_rate_interval_is_clopper_pearson(k: int, n: int) -> None:
    """The exact interval's ends: P(X ≥ k | lower) = 0.025 = P(X ≤ k | upper), against term-by-term binomial
    sums; 0 and 1 at the edges."""
    lo, hi = rate_interval(k, n)
    ref_lo = 0.0 if k == 0 else _solve(lambda p: _binomial_tail(k, n, p, upper=True), 0.025)
    ref_hi = 1.0 if k == n else _solve(lambda p: -_binomial_tail(k, n, p, upper=False), -0.025)
    assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)
    assert lo <= k / n <= hi
    if k == 0:
        assert hi == pytest.approx(1 - 0.025 ** (1 / n))


def test_rate_interval_refuses_a_rate_that_is_none() -> None:
    with pytest.raises(ValueError, match="k = 3, n = 2"):
        rate_interval(3, 2)


def test_evaluate_with_controls_and_baselines(tmp_path: Path) -> None:
    f = np.load(FIXTURES / "mnist_eval16.npz")
    npz = tmp_path / "digits.npz"
    x = np.concatenate([f["x"]] * 2)
    yy = np.concatenate([f["y"]] * 2)
    np.savez(npz, x_test=x, y_test=yy, x_train=x, y_train=yy)
    out = tmp_path / "r"
    args = [
        "evaluate",
        "--model",
        "mnist-fisherreg",  # calibrated with feature squeezing, without a Mahalanobis fit
        "--data",
        str(npz),
        "--split",
        "evaluation",
        "--attacks",
        "fgsm:0.2,noise:0.05",
        "--baselines",
        "mahalanobis,mahalanobis_layers,feature_squeezing",
        "--out",
        str(out),
        "--no-cache",
    ]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["baselines"] == [
        "mahalanobis",
        "mahalanobis_layers",
    ]  # fitted and calibrated by the harness; feature_squeezing comes calibrated
    noise = rep["attacks"]["noise:0.05"]
    assert noise["control"] and noise["n_successful"] == rep["attacked_images"]
    with np.load(out / "scores.npz") as z:  # which noisy digits the classifier misreads: the control's false alarms are among the rest
        misread = z["noise:0.05/misread"]
        assert misread.dtype == bool and len(misread) == rep["attacked_images"] and "fgsm:0.2/misread" not in z.files
    assert noise["still_right"]["n"] == int((~misread).sum()) and 0 <= noise["still_right"]["flagged@0.05"] <= 1
    assert rep["attacks"]["fgsm:0.2"]["still_right"] is None and "still read right" in (out / "report.md").read_text()
    lo, hi = rate_interval(round(noise["still_right"]["flagged@0.05"] * noise["still_right"]["n"]), noise["still_right"]["n"])
    assert f"| {lo:.3f}–{hi:.3f} |" in (out / "report.md").read_text()  # the false-alarm rate's exact interval beside it
    # a control's own flags: flagged changed and not unchanged, never more than its flag rate; the unchanged images' rate beside
    for alpha in ("0.05", "0.01"):
        assert 0 <= noise["added"][f"flagged@{alpha}"] <= noise["decision"][f"tpr@{alpha}"]
        assert (
            noise["decision"][f"tpr@{alpha}"] <= noise["added"][f"flagged@{alpha}"] + rep["attacked_unchanged"][f"flagged@{alpha}"] + 1e-12
        )
    assert rep["attacks"]["fgsm:0.2"]["added"] is None and "flagged unchanged at" in (out / "report.md").read_text()
    scores = rep["attacks"]["fgsm:0.2"]["scores"]
    assert {"feature_squeezing", "mahalanobis", "mahalanobis_layers", "fisher_input_trace"} <= set(scores)
    assert (out / "roc-fgsm_0.2.png").stat().st_size > 1000
    # bench/redecide.py recomputes the decision rows from scores.npz: with the run's own decision, the same numbers
    argv = ["redecide", "--model", "mnist-fisherreg", "--report", str(out), "--out", str(tmp_path / "re")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        redecide.main()
    again = json.loads((tmp_path / "re" / "redecided.json").read_text())
    assert again["clean_fpr"] == rep["clean"]["decision_fpr"]
    for name, row in again["attacks"].items():
        assert {k: row[k] for k in ("tpr@0.05", "tpr@0.01", "auc")} == {
            k: rep["attacks"][name]["decision"][k] for k in ("tpr@0.05", "tpr@0.01", "auc")
        }


def test_a_controls_own_flags_leave_out_the_images_flagged_unchanged() -> None:
    """evaluate's `added`: flagged after the change and not before it, per α."""
    from service.lab.evaluate import _added

    p, unchanged = np.array([0.01, 0.2, 0.03, 0.008]), np.array([0.01, 0.01, 0.5, 0.5])
    assert _added(p, unchanged, (0.05, 0.01)) == {"flagged@0.05": 0.5, "flagged@0.01": 0.25}
