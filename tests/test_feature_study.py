"""bench/feature_study.py's extra columns and bench/attack_origins.py's quartiles, against slow, obvious
float64 references on the MNIST bundle's classifier; bench/column_auc.py's table on made-up tables."""

import numpy as np
import pytest
import torch

from bench import attack_origins, column_auc, feature_study
from service.core.bundle import Bundle
from service.lab import learn


def test_probe_steps_towards_the_runner_up_and_measures_what_the_step_did(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x = digits[0][:6]
    model = mnist.model.eval()
    cols = feature_study.probe(model, x, taus=(0.05,))
    for i in range(len(x)):  # one image at a time, in float64 sums
        xi = x[i : i + 1].clone().requires_grad_(True)
        z = model(xi)[0]
        y, r = [int(c) for c in z.topk(2).indices]
        (g,) = torch.autograd.grad(z[r] - z[y], xi)
        with torch.no_grad():
            zp = model((x[i : i + 1] + 0.05 * g.sign()).clamp(0, 1))[0].double()
        gain = float((zp[r] - zp[y]) - (z[r] - z[y]).detach().double())
        assert np.isclose(cols["probe_gain/12.75"][i], gain, rtol=1e-4, atol=1e-4)
        assert np.isclose(cols["probe_ratio/12.75"][i], gain / (0.05 * float(g.abs().double().sum())), rtol=1e-4, atol=1e-6)
        assert np.isclose(cols["probe_maxp/12.75"][i], float(torch.log_softmax(zp, 0).max()), atol=1e-6)
        assert cols["probe_turned/12.75"][i] == float(int(zp.argmax()) == r)
        assert np.isclose(cols["probe_l1"][i], np.log10(float(g.abs().double().sum())), atol=1e-5)
    assert (cols["probe_gain/12.75"] > 0).all()  # a step up the pair's gradient raises it


def test_knn_columns_match_a_brute_force_search(mnist: Bundle, digits512) -> None:  # type: ignore[no-untyped-def]
    x, y = digits512
    model = mnist.model.eval()
    bank = feature_study.Bank.of(model, x[::2], y[::2])  # every class (the fixture is ordered by class)
    cols = feature_study.knn(model, x[1:40:2], bank, batch=7)  # batches that do not divide the images
    h, z = feature_study.last_layer_input(model, x[1:40:2])
    for i in range(20):
        pred = int(z[i].argmax())
        sims = [(float(torch.dot(h[i] / h[i].norm(), b)), int(label)) for b, label in zip(bank.h, bank.y, strict=True)]
        ranked = sorted(sims, reverse=True)
        same = [s for s, label in ranked if label == pred][: feature_study.CLOSEST]
        other = [s for s, label in ranked if label != pred][: feature_study.CLOSEST]
        assert np.isclose(cols["knn_other"][i], np.mean([label != pred for _, label in ranked[: feature_study.NEAREST]]))
        assert np.isclose(cols["knn_same"][i], -np.mean(same), atol=1e-9)
        assert np.isclose(cols["knn_gap"][i], np.mean(other) - np.mean(same), atol=1e-9)
    assert len(bank.y) <= 256 and (cols["knn_same"] < 0).all()
    with pytest.raises(ValueError, match=r"≥ 5 images read right per class"):
        feature_study.Bank.of(model, x[:400], y[:400])  # no 8s or 9s


def test_a_bank_image_is_its_own_nearest_neighbour(mnist: Bundle, digits512) -> None:  # type: ignore[no-untyped-def]
    x, y = digits512
    model = mnist.model.eval()
    bank = feature_study.Bank.of(model, x[::2], y[::2])
    h, z = feature_study.last_layer_input(model, x[::2])
    right = z.argmax(1) == y[::2]
    sims = torch.nn.functional.normalize(h[right], dim=1) @ bank.h.T
    assert torch.allclose(sims.diagonal(), torch.ones(len(bank.y), dtype=torch.float64))
    assert (sims.argmax(1) == torch.arange(len(bank.y))).float().mean() > 0.95  # ties aside
    mask = torch.ones_like(sims, dtype=torch.bool)
    assert torch.allclose(feature_study.closest(sims, mask), sims.topk(feature_study.CLOSEST, 1).values.mean(1))
    assert (feature_study.closest(sims, ~mask) == -2.0).all()  # nothing where the mask never holds


def test_quartiles_split_at_the_edges() -> None:
    edges = np.array([1.0, 2.0, 3.0])
    assert attack_origins.quartile(np.array([0.5, 1.0, 1.5, 2.5, 3.0, 9.0]), edges).tolist() == [0, 1, 1, 2, 3, 3]


def test_column_auc_reads_a_control_among_its_images_still_read_right() -> None:
    """An attack that moves a column gives AUC 1; a control is measured on its still-right rows only (here
    the unmoved half: 0.25 against clean 0–9), and a column nothing moves gives 0.5."""

    def table(margin: np.ndarray) -> dict[str, np.ndarray]:
        return {"margin": margin, "entropy": np.ones(len(margin)), "shift": np.zeros((len(margin), 3)), "predicted": np.zeros(len(margin))}

    b = learn.Sets(
        table(np.arange(10.0)), {"pgd": table(np.arange(10.0) + 100), "noise": table(np.r_[np.arange(5.0) + 100, np.arange(5.0)])}
    )
    b.right["noise"] = np.r_[np.zeros(5, bool), np.ones(5, bool)]
    c = learn.Collected({"a": b, "b": b}, ["pgd"], ["noise"], {"pgd": "pgd", "noise": "noise"}, (np.zeros(1), np.zeros(1)), [], {})
    got = column_auc.aucs(c)
    assert got["margin"] == {"pgd": 1.0, "noise": 0.25}
    assert got["entropy"] == {"pgd": 0.5, "noise": 0.5}
    assert "shift" not in got and "| margin | 1.00 | 0.25 |" in column_auc.markdown(got, ["pgd", "noise"])
