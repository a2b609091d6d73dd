"""`fisherguard inspect` (service.inspection) and `fisherguard train` on small data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.bundle import load_bundle
from service.cli import main
from service.lab.inspection import class_pair_kl, kl_matrix, mean_between_class_kl
from tests.conftest import FIXTURES


def brute_force_kl(p: torch.Tensor, y: torch.Tensor) -> float:
    """Mean of Σ_k p_ik log(p_ik / p_jk) over ordered pairs i ≠ j of different labels, one pair at a time."""
    total, pairs = 0.0, 0
    for i in range(len(p)):
        for j in range(len(p)):
            if y[i] != y[j]:
                total += sum(float(p[i, k] * torch.log(p[i, k] / p[j, k])) for k in range(p.shape[1]))
                pairs += 1
    return total / pairs


def test_between_class_kl_equals_the_pairwise_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(3 * torch.randn(13, 4, generator=gen, dtype=torch.float64), 1)
    y = torch.tensor([0, 1, 2, 0, 1, 1, 3, 2, 0, 0, 3, 1, 2])
    sums, counts = class_pair_kl(log_p, y, 4, block=5)  # blocks that do not divide N
    assert mean_between_class_kl(sums, counts) == pytest.approx(brute_force_kl(log_p.exp(), y), rel=1e-12)
    assert counts.sum() == 13 * 12 and counts[0, 0] == 4 * 3 and counts[0, 1] == 4 * 4


def test_kl_matrix_is_zero_on_the_diagonal_and_nonnegative() -> None:
    log_p = torch.log_softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 1)
    kl = kl_matrix(log_p, log_p)
    assert torch.allclose(kl.diagonal(), torch.zeros(6, dtype=torch.float64), atol=1e-14) and (kl >= -1e-14).all()


@pytest.fixture
def small_npz(tmp_path: Path) -> Path:
    """The 16 fixture digits as an MNIST-style npz: tiled 16× as a training split, once as the test split."""
    f = np.load(FIXTURES / "mnist_eval16.npz")
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=np.tile(f["x"], (16, 1, 1)), y_train=np.tile(f["y"], 16), x_test=f["x"], y_test=f["y"])
    return path


def test_inspect_compares_two_models(tmp_path: Path, small_npz: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inspect"
    args = ["inspect", "--model", "mnist", "--model", str(load_bundle("mnist").path), "--data", str(small_npz), "--out", str(out)]
    assert main(args) == 0
    reports = json.loads((out / "inspect.json").read_text())
    assert [r["bundle"]["name"] for r in reports] == ["mnist", "mnist"] and reports[0]["n"] == 16
    r = reports[0]
    assert r["accuracy"] == 1.0 and r["mean_between_class_kl"] > 1.0
    assert r["log10_lambda_max"]["q50"] <= r["log10_trace"]["q50"] and 0 < r["top_fraction"]["q50"] <= 1
    assert sum(c["n"] for c in r["per_class"].values()) == 16
    assert (out / "lambda-max-by-class.png").stat().st_size > 1000 and (out / "top-fraction.png").exists()
    assert "| mnist | 1.0000 |" in capsys.readouterr().out


def test_train_with_fisher_penalty_writes_a_servable_bundle(tmp_path: Path, small_npz: Path) -> None:
    out = tmp_path / "mnist-fisherreg"
    assert main(["train", "--bundle", "mnist", "--fisher-penalty", "1", "--epochs", "1", "--data", str(small_npz), "--out", str(out)]) == 0
    b = load_bundle(out)
    assert b.name == "mnist-fisherreg" and b.card["training"]["fisher_penalty"] == 1.0 and b.calibration is None
    assert b.card["param_count"] == 455114
    f = np.load(small_npz)  # the card's accuracy is measured on the test split: the 16 fixture digits
    x, y = torch.from_numpy(f["x_test"]).float().div(255)[:, None], torch.from_numpy(f["y_test"]).long()
    with torch.no_grad():
        assert b.card["test_accuracy"] == round(float((b.model(x).argmax(1) == y).float().mean()), 4)


def test_train_refuses_a_negative_penalty(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--bundle", "mnist", "--fisher-penalty", "-1"]) == 2
    assert "--fisher-penalty must be >= 0, got -1.0" in capsys.readouterr().err
