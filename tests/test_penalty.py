"""The training-time Fisher penalty (service.fisher.penalty) against the float64 reference tr G_x,
its θ-gradient against finite differences, and a short seeded training run (models.training.fit)."""

import itertools

import pytest
import torch
from torch import Tensor, nn

from service.fisher import compute
from service.fisher.penalty import input_fisher_trace_estimate, rademacher
from service.lab.training.loop import fit
from tests.reference import double, reference
from tests.small_models import make


def all_signs(k: int) -> Tensor:
    """Every ±1 vector of length k: their mean outer product is exactly I. -> (2^k, k)."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=k)), dtype=torch.float64)


def mean_over_probes(model: nn.Module, x: Tensor) -> Tensor:
    """E_u of the estimate over all 2^K sign vectors, per image, differentiable in θ. -> (N,)."""
    x = x.clone().requires_grad_(True)
    k = model(x[:1]).shape[1]
    values = [input_fisher_trace_estimate(model(x), x, u.expand(len(x), k)) for u in all_signs(k)]
    return torch.stack(values).mean(0)


@pytest.mark.parametrize("name", ["mlp", "bncnn", "resnet"])
def test_probe_average_is_exactly_the_trace(name: str) -> None:
    model, shape = make(name)
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    ref = reference(model, x)["fisher_input_trace"]
    torch.testing.assert_close(mean_over_probes(double(model), x.double()).detach(), ref, rtol=1e-10, atol=1e-14)


def test_single_probe_estimates_are_unbiased_on_the_shipped_kind_of_model() -> None:
    model, shape = make("bncnn")
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(2)).double().requires_grad_(True)
    m = double(model)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([input_fisher_trace_estimate(m(x), x, rademacher((4, 6), gen).double()) for _ in range(500)]).detach()
    exact = mean_over_probes(m, x.detach()).detach()  # = tr G_x (previous test)
    stderr = draws.std(0) / 500**0.5
    assert ((draws.mean(0) - exact).abs() < 4 * stderr + 1e-12).all(), (draws.mean(0), exact, stderr)


@pytest.mark.parametrize("name", ["mlp", "bncnn"])
def test_penalty_gradient_matches_finite_differences(name: str) -> None:
    """∇_θ of one probe's estimate (double backprop) = central differences, per parameter tensor."""
    model, shape = make(name)
    m = double(model)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(4)).double()
    u = rademacher((2, m(x).shape[1]), torch.Generator().manual_seed(5)).double()
    for p in m.parameters():

        def penalty(w: Tensor, p: nn.Parameter = p) -> Tensor:
            saved = p.data
            p.data = w
            try:
                xg = x.clone().requires_grad_(True)
                return input_fisher_trace_estimate(m(xg), xg, u).sum()
            finally:
                p.data = saved

        w = p.detach().clone().requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(input_fisher_trace_estimate(m(xg), xg, u).sum(), p)
        flat = w.detach().reshape(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):  # a few coordinates per tensor
            e = torch.zeros_like(flat)
            e[i] = 1e-6
            fd = (penalty((flat + e).view_as(w)) - penalty((flat - e).view_as(w))) / 2e-6
            assert abs(float(fd) - float(grad.reshape(-1)[i])) < 1e-6 * (1 + abs(float(fd))), (p.shape, i, fd, grad.reshape(-1)[i])


def test_probe_averaged_gradient_is_the_gradient_of_the_exact_trace() -> None:
    """Unbiased gradient: d/dθ of the reference tr G_x (finite differences) = ∇_θ E_u[estimate]."""
    model, shape = make("mlp")
    m = double(model)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(6)).double()
    head = m[3] if isinstance(m, nn.Sequential) else None
    assert isinstance(head, nn.Linear)
    w = head.weight
    (grad,) = torch.autograd.grad(mean_over_probes(m, x).sum(), w)

    def exact_at(i: int, j: int, step: float) -> float:
        with torch.no_grad():
            w[i, j] += step
        value = float(reference(m, x)["fisher_input_trace"].sum())
        with torch.no_grad():
            w[i, j] -= step
        return value

    for i, j in [(0, 0), (2, 5), (4, 15)]:
        up, down = exact_at(i, j, 1e-6), exact_at(i, j, -1e-6)
        assert abs(float((up - down) / 2e-6) - float(grad[i, j])) < 1e-6 * (1 + abs(float(grad[i, j])))


def _toy_data(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two classes of 6×6 images: a bright square top-left or bottom-right, plus noise."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = 0.3 * torch.rand(n, 1, 6, 6, generator=gen)
    x[y == 0, :, :3, :3] += 0.5
    x[y == 1, :, 3:, 3:] += 0.5
    return x, y


@pytest.mark.slow
def test_training_with_the_penalty_lowers_the_input_fisher_trace() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = _toy_data(512, gen)
    traces = {}
    for beta in (0.0, 10.0):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.Tanh(), nn.Linear(32, 10))
        acc = fit(model, (x, y, x, y), lambda xb, g: xb, epochs=5, batch=64, lr=0.1, seed=0, fisher_penalty=beta)
        assert acc > 0.95
        traces[beta] = float(compute(model.eval(), x, scores=("fisher_input_trace",)).scores["fisher_input_trace"].mean())
    assert traces[10.0] < 0.5 * traces[0.0], traces
