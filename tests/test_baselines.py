"""The multi-layer Mahalanobis baseline and the squeeze drop against float64 loop references, the
former's layer choice and its file."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from service.core.baselines import PENULTIMATE, Mahalanobis, available, baseline_scores, features, forward_scores, stage_outputs
from tests import small_models


def _reference_fit(f: Tensor, y: Tensor) -> tuple[dict[int, Tensor], Tensor]:
    """Class means and the ridge-regularised tied precision, by loops over samples (float64)."""
    classes = sorted({int(c) for c in y})
    means = {c: sum((f[i] for i in range(len(f)) if int(y[i]) == c), torch.zeros(f.shape[1], dtype=torch.float64)) for c in classes}
    means = {c: m / int((y == c).sum()) for c, m in means.items()}
    cov = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
    for i in range(len(f)):
        d = f[i] - means[int(y[i])]
        cov += torch.outer(d, d) / len(f)
    return means, torch.linalg.inv(cov + 1e-3 * cov.trace() / len(cov) * torch.eye(len(cov), dtype=torch.float64))


def _reference_distance(f: Tensor, means: dict[int, Tensor], precision: Tensor) -> Tensor:
    return torch.tensor(
        [min(float((f[i] - m) @ precision @ (f[i] - m)) for m in means.values()) for i in range(len(f))], dtype=torch.float64
    )


@pytest.mark.parametrize(("name", "taps"), [("bncnn", ["2", "5", "6"]), ("resnet", ["block", "pool"]), ("mlp", [])])
def test_stage_outputs_are_the_ends_of_the_stages(name: str, taps: list[str]) -> None:
    model, shape = small_models.make(name)
    assert stage_outputs(model, torch.rand(2, *shape)) == taps


@pytest.mark.parametrize("name", ["bncnn", "resnet"])
def test_layers_score_equals_the_loop_reference(name: str) -> None:
    """Σ_l min_c (f_l − μ_lc)ᵀ Σ_l⁻¹ (f_l − μ_lc) / median_train d_l, with f_l the channel means of each stage's output."""
    model, shape = small_models.make(name)
    model = model.double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, *shape, dtype=torch.float64, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    fit = Mahalanobis.fit(model, x, y)
    taps = stage_outputs(model, x)[1:]  # the first stage reacts to any pixel change
    assert list(fit.layers) == [*taps, PENULTIMATE] and taps
    test = torch.rand(7, *shape, dtype=torch.float64, generator=gen)
    expected = torch.zeros(7, dtype=torch.float64)
    for tap in [*taps, PENULTIMATE]:
        store: list[Tensor] = []
        module = dict(model.named_modules())[tap] if tap != PENULTIMATE else [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        take_input = tap == PENULTIMATE
        hook = module.register_forward_hook(lambda m, a, o, store=store, take_input=take_input: store.append(a[0] if take_input else o))
        with torch.no_grad():
            model(x), model(test)
        hook.remove()
        train_f, test_f = (t.mean((2, 3)) if t.dim() == 4 else t.flatten(1) for t in store)
        means, precision = _reference_fit(train_f, y)
        scale = float(_reference_distance(train_f, means, precision).median())
        assert fit.layers[tap][1] == pytest.approx(scale, rel=1e-9)
        expected += _reference_distance(test_f, means, precision) / scale
    assert torch.allclose(fit.layers_score(model, test), expected, rtol=1e-9)
    assert torch.allclose(fit.score(model, test), fit.layers[PENULTIMATE][0].distance(features(model, test, [])[PENULTIMATE]))


def test_layers_score_is_differentiable_in_x() -> None:
    model, shape = small_models.make("bncnn")
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    fit = Mahalanobis.fit(model, torch.rand(40, *shape, dtype=torch.float64, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    x = torch.rand(2, *shape, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fit.layers_score(model, t, grad=True), (x,), fast_mode=True)


def test_fit_file_round_trip_and_a_penultimate_only_file(tmp_path: Path) -> None:
    model, shape = small_models.make("resnet")
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(30, *shape, generator=gen), torch.randint(0, 4, (30,), generator=gen)
    fit = Mahalanobis.fit(model, x, y)
    fit.save(tmp_path / "m.safetensors", "ab" * 32)
    back, sha = Mahalanobis.load(tmp_path / "m.safetensors")
    assert sha == "ab" * 32 and list(back.layers) == ["pool", PENULTIMATE]
    assert torch.equal(back.layers_score(model, x[:5]), fit.layers_score(model, x[:5]))
    assert available(back) == ("feature_squeezing", "squeeze_drop", "mahalanobis", "mahalanobis_layers")
    # a file written before the multi-layer score: the penultimate fit only
    save_file(
        {"means": fit.penultimate.means.contiguous(), "precision": fit.penultimate.precision.contiguous()},
        str(tmp_path / "old.safetensors"),
        {"weights_sha256": "cd" * 32},
    )
    old, _ = Mahalanobis.load(tmp_path / "old.safetensors")
    assert old.layers == {} and available(old) == ("feature_squeezing", "squeeze_drop", "mahalanobis")
    assert torch.equal(old.score(model, x[:5]), fit.score(model, x[:5]))
    with pytest.raises(ValueError, match="has no hidden layers"):
        baseline_scores(model, x[:5], ["mahalanobis_layers"], old)


def test_explicit_taps_are_kept() -> None:
    model, shape = small_models.make("bncnn")
    gen = torch.Generator().manual_seed(3)
    fit = Mahalanobis.fit(model, torch.rand(30, *shape, generator=gen), torch.randint(0, 3, (30,), generator=gen), taps=["5"])
    assert list(fit.layers) == ["5", PENULTIMATE] and fit.layers["5"][0].means.shape == (3, 6)
    with pytest.raises(ValueError, match=r"no modules named \['nope'\]"):
        Mahalanobis.fit(model, torch.rand(4, *shape), torch.zeros(4, dtype=torch.long), taps=["5", "nope"])


def test_both_mahalanobis_scores_take_one_forward_pass() -> None:
    """The shipped MNIST decision reads both scores on the request path: one forward pass serves both."""
    model, shape = small_models.make("bncnn")
    gen = torch.Generator().manual_seed(4)
    fit = Mahalanobis.fit(model, torch.rand(30, *shape, generator=gen), torch.randint(0, 3, (30,), generator=gen))
    x = torch.rand(5, *shape, generator=gen)
    calls: list[int] = []
    hook = model.register_forward_hook(lambda m, a, o: calls.append(1))
    both = baseline_scores(model, x, ["mahalanobis", "mahalanobis_layers"], fit)
    hook.remove()
    assert len(calls) == 1
    assert torch.equal(both["mahalanobis"], fit.score(model, x)) and torch.equal(both["mahalanobis_layers"], fit.layers_score(model, x))


@pytest.mark.parametrize(("name", "levels"), [("mlp", 1), ("bncnn", 31), ("resnet", 31)])
def test_squeeze_drop_equals_the_loop_reference(name: str, levels: int) -> None:
    """log p_ŷ(x) − log p_ŷ(b(x)), ŷ = argmax p(x), b = rounding to levels + 1 values (1 bit for
    greyscale, 5 for colour), one image at a time in float64; zero on an image already at that depth."""
    model, shape = small_models.make(name)
    model = model.double().eval()
    x = torch.rand(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = []
    with torch.no_grad():
        for xi in x:
            z, zb = model(xi[None])[0], model((xi * levels).round()[None] / levels)[0]
            y = int(z.argmax())
            expected.append(float(z[y] - z.logsumexp(0) - (zb[y] - zb.logsumexp(0))))
        served = forward_scores(model, x, ["squeeze_drop"], None)[1]["squeeze_drop"]
        squeezed = forward_scores(model, (x * levels).round() / levels, ["squeeze_drop"], None)[1]["squeeze_drop"]
    torch.testing.assert_close(served, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert served.abs().max() > 1e-6 and torch.equal(squeezed, torch.zeros(5, dtype=torch.float64))
