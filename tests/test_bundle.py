"""Bundles (docs/bundles.md) and calibration files (docs/detection.md#calibration)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.bundle import Bundle, BundleError, load_bundle
from service.core.calibration import COMBINED, Calibration, Combination, Component
from service.fisher import HEATMAPS, SCORES, compute
from service.lab.data import jpeg_split
from tests.conftest import DATA, FIXTURES


def accuracy(bundle: Bundle, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((bundle.model(x).argmax(1) == y).float().mean())


def test_shipped_mnist_bundle(mnist: Bundle, digits512) -> None:  # type: ignore[no-untyped-def]
    assert mnist.classes == [str(d) for d in range(10)]
    assert mnist.input_shape == (1, 28, 28)
    card = mnist.card
    assert accuracy(mnist, *digits512) >= 0.985  # 509 of 512 held-out digits here; the card: 99.54% of the 10,000
    assert card["training_data"]["sha256"] == "c3b4aadaefe08c5229d60a6d5e39187df38c4f0952536322357dcf401a6a3008"
    assert card["param_count"] == sum(p.numel() for p in mnist.model.parameters())
    assert card["weights_sha256"] == mnist.weights_sha256
    assert not mnist.model.training
    cal = mnist.calibration
    assert cal is not None and cal.weights_sha256 == mnist.weights_sha256
    detector_scores = {"learned", "fisher_noise_shift"}
    baselines = {"feature_squeezing", "squeeze_drop", "mahalanobis", "mahalanobis_layers"}
    assert cal.n > 1200 and set(cal.values) == set(SCORES) | baselines | detector_scores
    assert cal.decision_scores == ("squeeze_drop", "learned") and mnist.detector is not None
    assert cal.data["correct"] > 2450 and mnist.mahalanobis is not None and list(mnist.mahalanobis.layers) == ["7", "8", "penultimate"]
    assert "calibration half" in cal.data["description"]


def test_the_channels_last_max_pool_is_nn_max_pool_bit_for_bit(mnist: Bundle, digits512) -> None:  # type: ignore[no-untyped-def]
    """models.mnist.model.MaxPool2d against nn.MaxPool2d in the same network: logits (with and without
    gradients), input and parameter gradients equal exactly, on digits (whose flat background ties every
    window) and on noise."""
    import copy

    from models.mnist.model import MaxPool2d

    net = mnist.model
    assert isinstance(net, torch.nn.Sequential)
    plain = copy.deepcopy(net)
    swapped = [i for i, m in enumerate(plain) if isinstance(m, MaxPool2d)]
    assert swapped == [4, 8]
    for i in swapped:
        plain[i] = torch.nn.MaxPool2d(2)
    x = torch.cat([digits512[0][:32], torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))])
    grads = []
    for model in (net, plain):
        xr = x.clone().requires_grad_(True)
        z = model(xr)
        gx, *gp = torch.autograd.grad(z.log_softmax(1).amax(1).sum(), [xr, *model.parameters()])
        grads.append((z, gx, gp))
    (z0, gx0, gp0), (z1, gx1, gp1) = grads
    assert torch.equal(z0, z1) and torch.equal(gx0, gx1) and all(torch.equal(a, b) for a, b in zip(gp0, gp1, strict=True))
    with torch.no_grad():  # the channels-last path
        assert torch.equal(net(x), plain(x))


def test_shipped_cifar10_bundle() -> None:
    b = load_bundle("cifar10")
    assert b.input_shape == (3, 32, 32) and b.classes[:2] == ["airplane", "automobile"]
    assert b.card["training_data"]["sha256"] == "79dc3db9fb2b671e632a65307618b117ad7d2a315c023cdd4eaa529770a2ad32"
    assert b.card["param_count"] == sum(p.numel() for p in b.model.parameters())
    assert b.card["architecture"] == "models.cifar10.model:build_air"
    cal = b.calibration
    assert cal is not None and cal.weights_sha256 == b.weights_sha256 and cal.data["correct"] > 2200 and cal.n > 2200
    assert cal.decision_scores == ("learned",) and b.mahalanobis is not None and b.detector is not None
    assert "part B" in cal.data["description"]  # the detector trained on part A
    assert set(cal.values) == set(SCORES) | {"feature_squeezing", "squeeze_drop", "mahalanobis", "learned", "fisher_noise_shift"}
    with torch.no_grad():
        assert b.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_shipped_fisher_regularised_mnist_bundle(digits512) -> None:  # type: ignore[no-untyped-def]
    b = load_bundle("mnist-fisherreg")
    assert b.name == "mnist-fisherreg" and b.card["training"]["fisher_penalty"] == 1.0
    assert b.calibration is not None and b.calibration.weights_sha256 == b.weights_sha256 and b.calibration.n > 4900
    assert accuracy(b, *digits512) >= 0.985  # 509 of 512 here; the card: 99.11% of the 10,000


@pytest.mark.skipif(not (DATA / "mnist.npz").is_file(), reason="needs ../shared/data/mnist.npz (the full MNIST test set)")
@pytest.mark.parametrize("name", ["mnist", "mnist-fisherreg"])
def test_the_cards_accuracy_is_what_the_test_set_gives(name: str) -> None:
    b = load_bundle(name)
    with np.load(DATA / "mnist.npz") as d:
        x, y = torch.from_numpy(d["x_test"]).float().div(255)[:, None], torch.from_numpy(d["y_test"]).long()
    assert round(accuracy(b, x, y), 4) == b.card["test_accuracy"]


def test_one_image_alone_or_in_a_batch_on_the_shipped_model(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    batch = compute(mnist.model, x, list(SCORES), HEATMAPS)
    for i in (0, 7):
        alone = compute(mnist.model, x[i : i + 1], list(SCORES), HEATMAPS)
        for k in SCORES:
            assert torch.allclose(alone.scores[k], batch.scores[k][i : i + 1], rtol=1e-4, atol=1e-30), k
        for k in HEATMAPS:
            scale = batch.heatmaps[k][i].abs().max()
            assert torch.allclose(alone.heatmaps[k], batch.heatmaps[k][i : i + 1], rtol=1e-3, atol=1e-4 * float(scale)), k


@pytest.fixture
def bundle_copy(tmp_path: Path, mnist: Bundle) -> Path:
    dst = tmp_path / "mine"
    shutil.copytree(mnist.path, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return dst


def test_load_by_path(bundle_copy: Path) -> None:
    b = load_bundle(bundle_copy)
    assert b.path == bundle_copy.resolve() and b.name == "mnist" and b.calibration is not None


def test_refuses_a_calibration_made_for_other_weights(bundle_copy: Path) -> None:
    cal = json.loads((bundle_copy / "calibration.json").read_text())
    cal["weights_sha256"] = "0" * 64
    (bundle_copy / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(BundleError, match=r"was made for weights with sha256 .0000.*recalibrate"):
        load_bundle(bundle_copy)


def test_refuses_weights_that_do_not_match_the_card(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (bundle_copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"card\.json says"):
        load_bundle(bundle_copy)


def test_refuses_pickles(bundle_copy: Path) -> None:
    (bundle_copy / "model.safetensors").unlink()
    torch.save({}, bundle_copy / "model.pt")
    with pytest.raises(BundleError, match="only read from safetensors"):
        load_bundle(bundle_copy)


def test_unknown_bundle_lists_the_shipped_ones() -> None:
    with pytest.raises(BundleError, match=r"no bundle 'nope'.*'mnist'"):
        load_bundle("nope")


def test_architecture_file_inside_the_bundle(bundle_copy: Path, mnist: Bundle) -> None:
    shutil.copy(mnist.path / "model.py", bundle_copy / "net.py")
    card = json.loads((bundle_copy / "card.json").read_text())
    card["architecture"] = "./net.py:build"
    (bundle_copy / "card.json").write_text(json.dumps(card))
    assert load_bundle(bundle_copy).calibration is not None
    card["architecture"] = "./../../etc/x.py:build"
    (bundle_copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="not a file inside the bundle"):
        load_bundle(bundle_copy)


def _cal(values: np.ndarray, statistic: str = "sensitivity", tail: str = "one-sided") -> Calibration:
    return Calibration("w", {}, 0.05, statistic, {statistic: np.sort(values)}, tail=tail)


def test_conformal_p_values_count_as_defined() -> None:
    cal = _cal(np.array([1.0, 2.0, 3.0, 4.0]))
    # (1 + #{c ≥ t}) / (n + 1)
    assert cal.p_value("sensitivity", np.array([0.0, 2.0, 2.5, 4.0, 9.0])).tolist() == [1.0, 4 / 5, 3 / 5, 2 / 5, 1 / 5]
    low = Calibration("w", {}, 0.05, "margin", {"margin": np.array([1.0, 2.0, 3.0, 4.0])})
    assert low.p_value("margin", np.array([0.0, 2.0, 9.0])).tolist() == [1 / 5, 3 / 5, 1.0]  # (1 + #{c ≤ t}) / (n + 1)
    two = _cal(np.array([1.0, 2.0, 3.0, 4.0]), tail="two-sided")
    assert two.decision_p_value({"sensitivity": np.array([0.0, 2.5, 9.0])}).tolist() == [2 / 5, 1.0, 2 / 5]


@pytest.mark.parametrize("tail", ["one-sided", "two-sided"])
def test_the_false_positive_rate_is_at_most_alpha_on_exchangeable_data(tail: str) -> None:
    rng = np.random.default_rng(0)
    n, alpha, trials = 200, 0.05, 4000
    hits = 0
    for _ in range(trials):
        data = rng.standard_normal(n + 1)
        hits += int(_cal(data[:n], tail=tail).decision_p_value({"sensitivity": data[n:]})[0] <= alpha)
    rate = hits / trials
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)  # ≤ α up to sampling noise
    assert rate >= alpha - 0.02  # and not vacuous


def _combined(clean: dict[str, np.ndarray]) -> Calibration:
    combo = Combination.fit([Component("margin", "two-sided"), Component("sensitivity", "one-sided")], clean)
    return Calibration("w", {}, 0.05, COMBINED, {k: np.sort(v) for k, v in clean.items()}, tail="one-sided", combination=combo)


def test_combined_decision_counts_as_defined() -> None:
    clean = {"margin": np.arange(8.0), "sensitivity": np.arange(8.0)[::-1].copy()}
    cal = _combined(clean)
    a = np.random.default_rng(0).permutation(8)[:4]  # part A: the reference values
    assert cal.combination is not None and cal.combination.reference["margin"].tolist() == sorted(clean["margin"][a].tolist())
    assert cal.n == 4 and cal.decision_scores == ("margin", "sensitivity")
    t = {"margin": np.array([100.0]), "sensitivity": np.array([3.5])}
    ref_m, ref_s = cal.combination.reference["margin"], cal.combination.reference["sensitivity"]
    p_margin = min(1.0, 2 * min((1 + (ref_m >= 100).sum()) / 5, (1 + (ref_m <= 100).sum()) / 5))
    p_sens = (1 + (ref_s >= 3.5).sum()) / 5
    m = min(p_margin, p_sens)
    assert cal.decision_p_value(t).tolist() == [(1 + (cal.combination.values <= m).sum()) / 5]


def test_combined_decision_keeps_the_false_positive_guarantee() -> None:
    """Correlated scores, the minimum of two p-values: uncorrected it would flag up to 2α; calibrated, ≤ α."""
    rng = np.random.default_rng(1)
    n, alpha, trials = 200, 0.05, 3000
    hits = naive = 0
    for _ in range(trials):
        z = rng.standard_normal((n + 1, 2))
        clean = {"margin": z[:, 0], "sensitivity": 0.3 * z[:, 0] + z[:, 1]}
        cal = _combined({k: v[:n] for k, v in clean.items()})
        assert cal.combination is not None
        test = {k: v[n:] for k, v in clean.items()}
        hits += int(cal.decision_p_value(test)[0] <= alpha)
        naive += int(cal.combination.min_p(test)[0] <= alpha)
    rate = hits / trials
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials) and rate >= alpha - 0.02
    assert naive / trials > 1.4 * alpha  # what the calibration step corrects


def test_combined_calibration_json_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cal = _combined({"margin": rng.standard_normal(50), "sensitivity": rng.standard_normal(50)})
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    t = {"margin": rng.standard_normal(20), "sensitivity": rng.standard_normal(20)}
    assert again.statistic == "combined" and again.n == 25 and np.allclose(again.decision_p_value(t), cal.decision_p_value(t))
    d = json.loads((tmp_path / "c.json").read_text())["decision"]
    assert d["components"] == [{"score": "margin", "tail": "two-sided"}, {"score": "sensitivity", "tail": "one-sided"}]
    with pytest.raises(ValueError, match="needs its combination"):
        Calibration("w", {}, 0.05, COMBINED, {})


def test_calibration_json_round_trip(tmp_path: Path, mnist: Bundle) -> None:
    cal = mnist.calibration
    assert cal is not None
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert again.statistic == cal.statistic and again.tail == cal.tail and again.n == cal.n
    for k in cal.values:
        assert np.allclose(again.values[k], cal.values[k], rtol=1e-8)
    d = json.loads((tmp_path / "c.json").read_text())
    assert {"weights_sha256", "data", "n", "alpha", "decision", "scores", "created", "score_options"} <= set(d)
    assert d["data"]["sha256"] == "c3b4aadaefe08c5229d60a6d5e39187df38c4f0952536322357dcf401a6a3008"


def test_shipped_cifar10_bundle_classifies_held_out_images(cifar10: Bundle) -> None:
    """256 seeded images of the CIFAR-10 evaluation half (JPEG export, tests/fixtures); the card's
    accuracy is on all 10,000 test images."""
    with np.load(FIXTURES / "cifar10_eval256.npz") as d:
        x, y = jpeg_split(d, "test")
    assert accuracy(cifar10, x, y) >= 0.85  # 0.914 here; the card: 90.30% of the 10,000
