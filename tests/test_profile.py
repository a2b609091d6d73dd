"""The layer-wise Fisher profile and the neighbourhood response against float64 loop references
(docs/fisher.md#profile, docs/fisher.md#neighbourhood)."""

import pytest
import torch

from service.fisher import compute
from service.fisher.noise import noise_response, seeded_noise
from service.fisher.profile import profile
from tests.reference import double, profile_reference
from tests.small_models import make

HOOKABLE = ["mlp", "bncnn", "resnet", "air"]


@pytest.mark.parametrize("name", HOOKABLE)
def test_profile_matches_the_float64_reference(name: str) -> None:
    model, shape = make(name)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(5))
    got = profile(model, x)
    param, feature, layers = profile_reference(model, x)
    assert got.layers == layers
    assert got.param.dtype == torch.float64 and got.param.shape == (4, len(layers))
    torch.testing.assert_close(got.param, param, rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(got.feature, feature, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("name", HOOKABLE)
def test_profile_sums_to_the_binary_parameter_fisher_and_its_shares_to_one(name: str) -> None:
    """Σ_l ‖∇_{θ_l} s‖² · p̂(1 − p̂) = fisher_param_binary; the shares add up to 1; one image alone equals
    the same image in a batch."""
    model, shape = make(name)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(6))
    pr = profile(model, x)
    r = compute(model, x, ["fisher_param_binary", "confidence"])
    var = r.scores["confidence"] * (1 - r.scores["confidence"])
    torch.testing.assert_close(pr.param.sum(1) * var, r.scores["fisher_param_binary"], rtol=1e-4, atol=1e-30)
    torch.testing.assert_close((10 ** pr.log_shares()).view(5, 2, -1).sum(2), torch.ones(5, 2, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    alone = profile(model, x[2:3])
    torch.testing.assert_close(alone.param, pr.param[2:3], rtol=1e-4, atol=1e-12)


def test_profile_refuses_a_model_the_identities_do_not_cover() -> None:
    model, shape = make("shared")  # one Linear applied twice: no per-layer identity
    with pytest.raises(ValueError, match="a layer ran twice"):
        profile(model, torch.rand(2, *shape))
    grouped = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, groups=2), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    grouped(torch.rand(1, 2, 5, 5))
    with pytest.raises(ValueError, match="Linear, Conv2d"):
        profile(grouped, torch.rand(2, 2, 5, 5))


@pytest.mark.parametrize("name", ["mlp", "bncnn"])
def test_noise_response_matches_a_loop(name: str) -> None:
    model, shape = make(name)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        z = model(x)
    got = noise_response(model, x, z, 0.05, 6)
    m = double(model)
    eta = seeded_noise(x, 6).double()
    for n in range(3):
        with torch.no_grad():
            z0 = m(x[n : n + 1].double())[0]
            zq = m((x[n].double() + 0.05 * eta[n]).clamp(0, 1))  # (M, K)
        y = int(z0.argmax())
        shift = (zq - zq[:, y : y + 1]).mean(0) - (z0 - z0[y])
        torch.testing.assert_close(got["shift"][n], shift, rtol=1e-4, atol=1e-5)
        assert float(got["flip"][n]) == float((zq.argmax(1) != y).double().mean())
        lp, lq = torch.log_softmax(z0, 0), torch.log_softmax(zq, 1)
        torch.testing.assert_close(got["kl"][n], (lp.exp() * (lp - lq)).sum(1).mean(), rtol=1e-3, atol=1e-8)
