"""bench/decision.py's selection rule: decisions that flag the controls are ranked after those that do not."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import decision
from service.core.calibration import Calibration, Combination, Component, mondrian_references


def select(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean: dict[str, np.ndarray], attacks: dict[str, dict[str, np.ndarray]]
) -> list[dict]:
    """Runs `python -m bench.decision` on these per-image scores; its rows, best first."""
    flat = {f"clean/{k}": v for k, v in clean.items()} | {f"{a}/{k}": v for a, s in attacks.items() for k, v in s.items()}
    np.savez(tmp_path / "scores.npz", **flat)  # type: ignore[arg-type]
    monkeypatch.setattr(sys, "argv", ["decision", "--scores", str(tmp_path / "scores.npz"), "--out", str(tmp_path / "out")])
    decision.main()
    rows: list[dict] = json.loads((tmp_path / "out" / "decision.json").read_text())["rows"]
    return rows


def test_a_decision_that_flags_noise_is_not_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`margin` catches both attacks and the noise control; `feature_squeezing` catches fewer attacks and no
    noise: the rule chooses feature squeezing although its mean TPR is lower."""
    rng = np.random.default_rng(0)
    n, m = 4000, 400
    clean = {"margin": rng.normal(0, 1, n), "feature_squeezing": rng.normal(0, 1, n)}
    attacks = {  # margin: smaller = more unusual; feature squeezing: larger = more unusual
        "pgd": {"margin": rng.normal(-4, 1, m), "feature_squeezing": rng.normal(2.5, 1, m)},
        "noise:0.1": {"margin": rng.normal(-4, 1, m), "feature_squeezing": rng.normal(0, 1, m)},
    }
    rows = select(tmp_path, monkeypatch, clean, attacks)
    by_name = {" + ".join(r["components"]): r for r in rows}
    assert by_name["margin:one-sided"]["mean_tpr@0.05"] > 0.95 and not by_name["margin:one-sided"]["admissible"]
    assert by_name["margin:one-sided"]["worst_control@0.05"] > 0.9
    assert rows[0]["components"] == ["feature_squeezing:one-sided"] and rows[0]["admissible"]
    assert 0.6 < rows[0]["mean_tpr@0.05"] < 0.95 and rows[0]["worst_control@0.05"] < 0.065 and rows[0]["worst_control@0.01"] < 0.025
    assert all(not r["admissible"] for r in rows[rows.index(by_name["margin:one-sided"]) :])


def test_a_control_is_judged_by_its_false_alarms_when_the_run_recorded_which_images_are_misread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brightening makes the classifier misread 40% of its images: `squeeze_drop` flags exactly those
    (and about α of the rest), `margin` flags none of them and catches fewer attacks. Counted over all
    brightened images squeeze_drop is inadmissible; counted among the images still read right — what
    `misread` records — it is admissible and in the chosen decision. Both rates are kept."""
    rng = np.random.default_rng(2)
    n, m = 4000, 400
    misread = np.arange(m) < 0.4 * m
    clean = {"margin": rng.normal(0, 1, n), "squeeze_drop": rng.normal(0, 1, n)}
    bright = np.where(misread, rng.normal(5, 0.5, m), rng.normal(0, 1, m))
    attacks = {
        "pgd": {"margin": rng.normal(-2.5, 1, m), "squeeze_drop": rng.normal(4, 1, m)},
        "brightness:0.15": {"margin": rng.normal(0, 1, m), "squeeze_drop": bright},
    }
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    without = {" + ".join(r["components"]): r for r in select(tmp_path / "a", monkeypatch, clean, attacks)}
    assert not without["squeeze_drop:one-sided"]["admissible"] and without["margin:one-sided"]["admissible"]
    attacks["brightness:0.15"]["misread"] = misread
    rows = select(tmp_path / "b", monkeypatch, clean, attacks)
    assert "squeeze_drop:one-sided" in rows[0]["components"] and rows[0]["admissible"]
    drop = {" + ".join(r["components"]): r for r in rows}["squeeze_drop:one-sided"]
    assert drop["admissible"] and drop["worst_control_all@0.05"] > 0.4 > 0.065 > drop["worst_control@0.05"]
    assert drop["attacks"]["brightness:0.15"]["still_right@0.05"] == drop["worst_control@0.05"]
    assert "; " in (tmp_path / "b" / "out" / "decision.md").read_text()  # both rates in the table


def test_a_decision_that_holds_only_at_alpha_005_is_not_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mahalanobis` puts every attacked image between the clean 95% and 99% quantiles (TPR 1 at α = 0.05,
    0 at 0.01); `feature_squeezing` catches fewer at 0.05 and many more at 0.01: the rule weighs both α."""
    rng = np.random.default_rng(1)
    n, m = 4000, 400
    clean = {"mahalanobis": rng.normal(0, 1, n), "feature_squeezing": rng.normal(0, 1, n)}
    attacks = {"cw": {"mahalanobis": rng.uniform(1.8, 2.2, m), "feature_squeezing": rng.normal(2.8, 1, m)}}
    rows = select(tmp_path, monkeypatch, clean, attacks)
    by_name = {" + ".join(r["components"]): r for r in rows}
    maha, fs = by_name["mahalanobis:one-sided"], by_name["feature_squeezing:one-sided"]
    assert maha["mean_tpr@0.05"] > 0.95 > fs["mean_tpr@0.05"] > 0.8
    assert maha["mean_tpr@0.01"] < 0.05 and fs["mean_tpr@0.01"] > 0.5
    assert rows.index(fs) < rows.index(maha)
    assert rows[0]["mean_tpr"] == max(r["mean_tpr"] for r in rows if r["admissible"])


def test_when_nothing_is_admissible_the_least_excess_over_alpha_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both scores flag the blur control above α + 0.015; `margin` catches more attacks but flags the blur far
    more: the fallback puts `feature_squeezing`, the decision that departs least from α on the controls, first."""
    rng = np.random.default_rng(3)
    n, m = 4000, 400
    clean = {"margin": rng.normal(0, 1, n), "feature_squeezing": rng.normal(0, 1, n)}
    attacks = {
        "pgd": {"margin": rng.normal(-4, 1, m), "feature_squeezing": rng.normal(2.5, 1, m)},
        "blur:1": {"margin": rng.normal(-3, 1, m), "feature_squeezing": rng.normal(0.6, 1, m)},
    }
    rows = select(tmp_path, monkeypatch, clean, attacks)
    assert not any(r["admissible"] for r in rows)
    by_name = {" + ".join(r["components"]): r for r in rows}
    margin, fs = by_name["margin:one-sided"], by_name["feature_squeezing:one-sided"]
    assert margin["mean_tpr"] > fs["mean_tpr"] and margin["control_excess"] > fs["control_excess"] > 0.015
    fewest = min(r["controls_over"] for r in rows)
    assert rows[0]["control_excess"] == min(r["control_excess"] for r in rows if r["controls_over"] == fewest)
    assert rows.index(fs) < rows.index(margin)


def test_when_nothing_is_admissible_the_fewest_controls_over_the_goal_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decision flags heavy blur on every image, so all share the worst excess; `mahalanobis` catches
    more attacks but also flags brightness, `feature_squeezing` does not: one control every decision misses
    must not hide another that only some miss, so `feature_squeezing` (blur over at both α: 2 pairs) comes
    before `mahalanobis` and the combination (blur and brightness: 4)."""
    rng = np.random.default_rng(5)
    n, m = 4000, 400
    clean = {"mahalanobis": rng.normal(0, 1, n), "feature_squeezing": rng.normal(0, 1, n)}
    attacks = {
        "pgd": {"mahalanobis": rng.normal(5, 1, m), "feature_squeezing": rng.normal(2.5, 1, m)},
        "blur:1.5": {"mahalanobis": rng.normal(20, 1, m), "feature_squeezing": rng.normal(20, 1, m)},
        "brightness:0.1": {"mahalanobis": rng.normal(2, 1, m), "feature_squeezing": rng.normal(0, 1, m)},
    }
    rows = select(tmp_path, monkeypatch, clean, attacks)
    by_name = {" + ".join(r["components"]): r for r in rows}
    maha, fs = by_name["mahalanobis:one-sided"], by_name["feature_squeezing:one-sided"]
    both = by_name["feature_squeezing:one-sided + mahalanobis:one-sided"]
    assert not any(r["admissible"] for r in rows)
    assert maha["control_excess"] == fs["control_excess"] == both["control_excess"]  # blur at 1.0 for all
    assert (fs["controls_over"], maha["controls_over"], both["controls_over"]) == (2, 4, 4)
    assert maha["mean_tpr"] > fs["mean_tpr"] and rows[0] is not maha
    assert rows[0]["components"] == ["feature_squeezing:one-sided"]


def test_the_product_combination_is_calibrated_like_the_minimum() -> None:
    """`--combine product` (Fisher's method) ranks by Π_j p_j and is calibrated on part B like the served minimum:
    its p-values on fresh clean images are valid (P(p ≤ α) ≈ α), and an image that two components both find
    moderately unusual ranks as more unusual than under the minimum."""
    rng = np.random.default_rng(2)
    clean = {"margin": rng.normal(0, 1, 4000), "feature_squeezing": rng.normal(0, 1, 4000)}
    components = (Component("margin", "one-sided"), Component("feature_squeezing", "one-sided"))
    product, minimum = decision.Product.fit(components, clean), Combination.fit(components, clean)
    both = {"margin": np.array([-2.0]), "feature_squeezing": np.array([2.0])}  # each p ≈ 0.023
    ps = product.component_p_values(both)
    assert product.min_p(both) == pytest.approx(ps[0] * ps[1]) and minimum.min_p(both) == pytest.approx(min(ps))
    assert product.p_value(both)[0] < minimum.p_value(both)[0]
    fresh = {"margin": rng.normal(0, 1, 20000), "feature_squeezing": rng.normal(0, 1, 20000)}
    assert abs((product.p_value(fresh) <= 0.05).mean() - 0.05) < 0.01


def _two_class_calibration(rng: np.random.Generator, n: int, combined: bool) -> tuple[Calibration, dict[str, np.ndarray], np.ndarray]:
    """Clean margins of class 1 sit lower than those of class 0: pooled, class 1 takes most of the flags."""
    labels = rng.integers(0, 2, n)
    clean = {"margin": rng.normal(0, 1, n) - 1.5 * labels, "feature_squeezing": rng.normal(0, 1, n)}
    components = (Component("margin", "one-sided"), Component("feature_squeezing", "one-sided"))
    combination = Combination.fit(components, clean) if combined else None
    values = {k: np.sort(v) for k, v in clean.items()}
    cal = Calibration("0" * 64, {}, 0.05, "combined" if combined else "margin", values, combination=combination)
    return cal, clean, labels


@pytest.mark.parametrize("combined", [False, True])
def test_a_mondrian_calibration_holds_alpha_within_every_class(combined: bool) -> None:
    """Pooled, P(p ≤ α) ≤ α only over all images; class-conditional (each image ranked among its
    predicted class's clean images), within each class, for one statistic and for a combination."""
    rng = np.random.default_rng(5)
    cal, clean, labels = _two_class_calibration(rng, 6000, combined)
    fresh_labels = rng.integers(0, 2, 40000)
    fresh = {"margin": rng.normal(0, 1, 40000) - 1.5 * fresh_labels, "feature_squeezing": rng.normal(0, 1, 40000)}
    pooled = cal.decision_p_value(fresh)
    assert (pooled[fresh_labels == 1] <= 0.05).mean() > 0.062  # the low-margin class takes more than its share
    cal.mondrian = mondrian_references(cal, clean, labels)
    with pytest.raises(ValueError, match="predicted class"):
        cal.decision_p_value(fresh)
    p = cal.decision_p_value(fresh, fresh_labels)
    for c in (0, 1):
        assert abs((p[fresh_labels == c] <= 0.05).mean() - 0.05) < 0.008, c
    assert Calibration.from_json(json.loads(json.dumps(cal.to_json()))).decision_p_value(fresh, fresh_labels).tolist() == p.tolist()
    assert cal.decision_p_value(fresh, np.full(40000, 7)).min() == 1.0  # a class without references is never flagged
    assert cal.summary()["mondrian"] is True


def test_mondrian_references_refuse_values_a_combination_was_not_fitted_on() -> None:
    cal, clean, labels = _two_class_calibration(np.random.default_rng(6), 400, combined=True)
    with pytest.raises(ValueError, match="not the ones the combination was fitted on"):
        mondrian_references(cal, {k: v[::-1] for k, v in clean.items()}, labels[::-1])


def test_a_control_flagged_at_exactly_alpha_plus_the_slack_is_admissible() -> None:
    """5 of 200 images at α = 0.01 is 0.025 = α + 0.015, inside the rule; 0.025 − 0.01 in floating point is
    0.015000000000000001, which a plain comparison took for an excess."""
    assert 0.025 - 0.01 > decision.CONTROL_SLACK  # the floating-point trap the rule must not fall into
    assert decision.excess_over_alpha({0.05: 0.05, 0.01: 5 / 200}) <= decision.CONTROL_SLACK
    assert decision.excess_over_alpha({0.05: 13 / 200, 0.01: 0.0}) <= decision.CONTROL_SLACK
    assert decision.excess_over_alpha({0.05: 0.05, 0.01: 6 / 200}) > decision.CONTROL_SLACK
    assert decision.excess_over_alpha({0.05: 14 / 200, 0.01: 0.0}) > decision.CONTROL_SLACK
