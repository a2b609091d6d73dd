"""Every score and heatmap against the float64 reference, plus the invariants of docs/fisher.md."""

import pytest
import torch
from torch import nn

from service.fisher import HEATMAPS, SCORES, compute, gradients, persample
from service.fisher.compute import _auto_chunk
from service.fisher.gradients import forward
from service.fisher.noise import image_seed
from service.fisher.plan import Options, Plan
from tests.reference import double, fis_finite_difference, fis_reference, reference
from tests.small_models import make

MODELS = ["mlp", "bncnn", "resnet", "air", "shared"]
EXACT = [s for s in SCORES if s != "fisher_noise_kl"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module", params=MODELS)
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    model, shape = make(request.param)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(1))
    return request.param, model, x, reference(model, x)


@pytest.mark.parametrize("score", EXACT)
def test_score_matches_float64_reference(case, score: str) -> None:  # type: ignore[no-untyped-def]
    _, model, x, ref = case
    got = compute(model, x, [score]).scores[score]
    assert got.dtype == torch.float64 and got.shape == (len(x),)
    assert ((got - ref[score]).abs() / ref[score].abs()).max() < 1e-3


@pytest.mark.parametrize("heatmap", HEATMAPS)
def test_heatmap_matches_float64_reference(case, heatmap: str) -> None:  # type: ignore[no-untyped-def]
    _, model, x, ref = case
    got = compute(model, x, [], [heatmap]).heatmaps[heatmap]
    assert got.shape == ref[heatmap].shape
    assert _rel(got, ref[heatmap]) < 1e-3


def test_the_fast_path_is_taken_where_it_applies() -> None:
    for name, fast in [("mlp", True), ("bncnn", True), ("resnet", True), ("air", True), ("shared", False)]:
        model, shape = make(name)
        _, tape = forward(model, torch.rand(2, *shape, requires_grad=True), True)
        assert (tape is not None) == fast, name


@pytest.mark.parametrize("name", ["mlp", "bncnn"])
def test_fis_equals_central_differences_of_its_definition(name: str) -> None:
    model, shape = make(name)
    m = double(model)
    xn = torch.rand(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = xn.clone().requires_grad_(True)
    log_p = torch.log_softmax(m(xr)[0], 0)
    y = int(log_p.argmax())
    params = list(m.parameters())
    v = torch.cat([g.reshape(-1) for g in torch.autograd.grad(log_p[y], params)])
    exact = fis_reference(m, xr, y, v)
    fd = fis_finite_difference(m, xn, y, v)
    assert _rel(exact, fd) < 1e-5
    got = compute(model, xn.float(), [], ["fis"]).heatmaps["fis"]
    assert _rel(got, exact.view(shape).sum(0)[None]) < 1e-3


def test_fis_takes_both_signs() -> None:
    model, shape = make("bncnn")
    fis = compute(model, torch.rand(4, *shape), [], ["fis"]).heatmaps["fis"]
    assert (fis < 0).any() and (fis > 0).any()


@pytest.mark.parametrize("name", MODELS)
def test_invariants(name: str) -> None:
    model, shape = make(name)
    x = torch.rand(6, *shape)
    r = compute(model, x, EXACT)
    sc = r.scores
    assert (sc["fisher_input_trace"] >= sc["fisher_input_eig"] * (1 - 1e-6)).all()
    assert (sc["fisher_input_eig"] >= 0).all()
    assert (sc["fisher_param_trace"] >= sc["fisher_form"] * (1 - 1e-6)).all()  # a Rayleigh quotient ≤ λ_max ≤ trace
    var = sc["confidence"] * (1 - sc["confidence"])
    assert torch.allclose(sc["fisher_input_binary"], var * sc["sensitivity"], rtol=1e-4)
    assert torch.allclose(sc["entropy"], -(r.probs.double() * r.probs.double().log()).sum(1), rtol=1e-4)


def test_input_fisher_has_rank_at_most_k_minus_1() -> None:
    model, shape = make("mlp")
    m = double(model)
    xn = torch.rand(1, *shape, dtype=torch.float64, requires_grad=True)
    z = m(xn)[0]
    p = torch.softmax(z, 0)
    jx = torch.stack([torch.autograd.grad(z[i], xn, retain_graph=True)[0].reshape(-1) for i in range(len(z))])
    g = jx.T @ (torch.diag(p) - torch.outer(p, p)) @ jx
    evals = torch.linalg.eigvalsh(g)
    assert int((evals > 1e-10 * evals[-1]).sum()) <= len(z) - 1


@pytest.mark.parametrize("name", MODELS)
def test_one_image_alone_or_in_a_batch_gives_the_same_numbers(name: str) -> None:
    model, shape = make(name)
    x = torch.rand(5, *shape)
    batch = compute(model, x, list(SCORES), HEATMAPS)
    alone = compute(model, x[2:3], list(SCORES), HEATMAPS)
    for key in SCORES:
        assert torch.allclose(alone.scores[key], batch.scores[key][2:3], rtol=1e-4, atol=1e-12), key
    for key in HEATMAPS:
        assert torch.allclose(alone.heatmaps[key], batch.heatmaps[key][2:3], rtol=1e-4, atol=1e-7), key


def _confident_mlp(scale: float) -> tuple[nn.Module, tuple[int, int, int]]:
    model, shape = make("mlp")
    head = model[3] if isinstance(model, nn.Sequential) else None
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return model, shape


def test_stable_at_large_margins() -> None:
    model, shape = _confident_mlp(400.0)
    x = torch.rand(64, *shape, generator=torch.Generator().manual_seed(3))
    margin = compute(model, x, ["margin"]).scores["margin"]
    x = x[(margin > 30) & (margin < 80)][:4]
    assert len(x) == 4
    r = compute(model, x, list(SCORES), HEATMAPS)
    for key, v in {**r.scores, **r.heatmaps}.items():
        assert torch.isfinite(v).all(), key
    for key in EXACT:
        if SCORES[key].log:
            assert (r.scores[key] > 0).all(), key  # p̂(1 − p̂) ≈ e^-30 is tiny, never zero
            assert torch.isfinite(r.log10(key)).all() and (r.log10(key) > -30).all()
    ref = reference(model, x[:2])
    for key in EXACT:
        assert ((r.scores[key][:2] - ref[key]).abs() / ref[key].abs()).max() < 1e-3, key


def test_log10_floor() -> None:
    model, shape = _confident_mlp(10_000.0)
    r = compute(model, torch.rand(2, *shape), ["fisher_input_binary", "margin"])
    assert (r.log10("fisher_input_binary") >= -30).all()
    assert torch.equal(r.log10("margin"), r.scores["margin"])


def test_top_class_truncation_reports_the_mass_it_drops() -> None:
    model, shape = make("bncnn")
    x = torch.rand(4, *shape)
    names = ["fisher_input_trace", "fisher_param_trace", "fisher_input_eig"]
    full = compute(model, x, names)
    assert torch.all(full.neglected_mass < 1e-6)
    part = compute(model, x, names, top_classes=2)
    p = full.probs.double().sort(1, descending=True).values
    assert torch.allclose(part.neglected_mass, 1 - p[:, :2].sum(1), atol=1e-6)
    for key in names:
        assert (part.scores[key] <= full.scores[key] * (1 + 1e-6)).all()
    same = compute(model, x, names, top_classes=6)  # m = K is exact
    for key in names:
        assert torch.allclose(same.scores[key], full.scores[key], rtol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_lanczos_matches_the_exact_eigenpair(name: str) -> None:
    model, shape = make(name)
    x = torch.rand(3, *shape)
    exact = compute(model, x, ["fisher_input_eig"], ["eigvec"], eig_method="exact")
    lanczos = compute(model, x, ["fisher_input_eig"], ["eigvec"], eig_method="lanczos")
    assert _rel(lanczos.scores["fisher_input_eig"], exact.scores["fisher_input_eig"]) < 1e-4
    assert _rel(lanczos.heatmaps["eigvec"], exact.heatmaps["eigvec"].double()) < 1e-3


def test_noise_kl_is_seeded_by_the_image_and_matches_a_loop() -> None:
    model, shape = make("mlp")
    x = torch.rand(3, *shape)
    a = compute(model, x, ["fisher_noise_kl"]).scores["fisher_noise_kl"]
    b = compute(model, x.flip(0), ["fisher_noise_kl"], noise_samples=16).scores["fisher_noise_kl"]
    assert torch.allclose(a, b.flip(0))
    for n in range(3):
        eta = torch.randn((16, *shape), generator=torch.Generator().manual_seed(image_seed(x[n])))
        with torch.no_grad():
            logp = torch.log_softmax(model(x[n : n + 1]).double(), 1)
            logq = torch.log_softmax(model((x[n] + 0.1 * eta).clamp(0, 1)).double(), 1)
        kl = (logp.exp() * (logp - logq)).sum(1).mean()
        assert abs(float(a[n]) - float(kl)) < 1e-9


def test_noise_kl_is_half_sigma_squared_trace_for_small_sigma() -> None:
    model, shape = make("mlp")
    x = 0.25 + 0.5 * torch.rand(2, *shape)  # away from the clip at 0 and 1
    sigma = 1e-2
    kl = compute(model, x, ["fisher_noise_kl"], noise_sigma=sigma, noise_samples=4000).scores["fisher_noise_kl"]
    tr = compute(model, x, ["fisher_input_trace"]).scores["fisher_input_trace"]
    assert torch.allclose(kl, 0.5 * sigma**2 * tr, rtol=0.1)


def test_unknown_names_raise_and_list_the_known_ones() -> None:
    model, shape = make("mlp")
    with pytest.raises(ValueError, match=r"unknown score.*'bogus'.*fisher_form"):
        compute(model, torch.rand(1, *shape), ["bogus"])
    with pytest.raises(ValueError, match=r"unknown heatmap.*known heatmaps"):
        compute(model, torch.rand(1, *shape), [], ["nope"])


def test_model_mode_is_restored() -> None:
    model, shape = make("bncnn")
    model.train()
    compute(model, torch.rand(2, *shape), ["sensitivity"])
    assert model.training


class Big(nn.Module):
    """A 3×224×224 classifier with K = 1000 classes: the memory-bounded path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 7, stride=4, padding=3)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(64, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.slow
def test_large_inputs_and_many_classes_stay_bounded() -> None:
    torch.manual_seed(0)
    model = Big().eval()
    x = torch.rand(3, 3, 224, 224)
    names = ["sensitivity", "fisher_input_trace", "fisher_input_eig", "fisher_param_trace"]
    step = _auto_chunk(model, x, Plan.of(names, ["eigvec"]), Options(top_classes=20))
    assert step * 21 * x[0].numel() <= 1 << 26
    r = compute(model, x, names, ["eigvec"], top_classes=20, eig_method="lanczos")
    one = compute(model, x[1:2], names, ["eigvec"], top_classes=20, eig_method="lanczos", chunk_size=1)
    for key in names:
        assert torch.allclose(r.scores[key][1:2], one.scores[key], rtol=1e-4), key
    assert (r.neglected_mass > 0).all() and (r.neglected_mass < 1).all()
    # Lanczos sees the full G_x; the top-20 Gram sees G_x restricted to 20 classes, a lower bound (≼).
    trunc = compute(model, x, ["fisher_input_eig"], top_classes=20, eig_method="exact").scores["fisher_input_eig"]
    assert (r.scores["fisher_input_eig"] >= trunc * (1 - 1e-6)).all()
    assert (r.scores["fisher_input_trace"] >= trunc * (1 - 1e-6)).all()


@pytest.mark.parametrize("name", ["mlp", "shared"])
def test_fis_where_float32_cannot_hold_one_minus_p_hat(name: str) -> None:
    """Margins 20–30: 1 − p̂ < 1e-8 rounds away in float32; the float64 reference still resolves it."""
    x = torch.rand(256, *make(name)[1], generator=torch.Generator().manual_seed(4))
    for scale in (25.0, 50.0, 100.0, 200.0, 400.0):
        model, _ = make(name)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(scale)
            last.bias.mul_(scale)
        margin = compute(model, x, ["margin"]).scores["margin"]
        if int(((margin > 20) & (margin < 30)).sum()) >= 2:
            break
    x = x[(margin > 20) & (margin < 30)][:2]
    assert len(x) == 2
    ref = reference(model, x)
    got = compute(model, x, [], ["fis"]).heatmaps["fis"]
    assert _rel(got, ref["fis"]) < 1e-3


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_ghost_products_equal_per_sample_weight_gradients(bias: bool, stride: int, padding: int, dilation: int) -> None:
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 7, 3, stride, padding, dilation, bias=bias).double()
    a = torch.randn(4, 3, 9, 9, dtype=torch.float64, generator=gen)
    out = conv(a)
    gs = [torch.randn(out.shape, dtype=torch.float64, generator=gen) for _ in range(5)]
    diag, cross = persample._conv_ghost_products(conv, a, gs, ref=2)
    feats = persample._conv_features_stacked(conv, a, gs)  # per-sample weight (and bias) gradients
    want_diag = torch.stack([persample._dot(f, f) for f in feats], 1)
    want_cross = torch.stack([persample._dot(f, feats[2]) for f in feats], 1)
    assert cross is not None
    torch.testing.assert_close(diag, want_diag, rtol=1e-12, atol=0)
    torch.testing.assert_close(cross, want_cross, rtol=1e-12, atol=1e-12)


def _forwards(model: nn.Module) -> list[int]:
    """A counter of the model's forward calls (its first element)."""
    calls = [0]

    def hook(_m: nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(hook)
    return calls


def test_the_tape_copies_only_the_layer_outputs_modified_in_place() -> None:
    """ResNet block: bn1's output is overwritten by ReLU(inplace=True) and bn2's by `out += x`; the
    first call learns that (two forwards), later calls copy just those two outputs in one forward."""
    model, shape = make("resnet")
    calls = _forwards(model)
    x = torch.rand(3, *shape)
    with torch.enable_grad():
        z1, tape1 = forward(model, x.requires_grad_(True), True)
        assert tape1 is not None and calls[0] == 2
        copied = [i for i, s in enumerate(tape1.sites) if s.module in (model.block.bn1, model.block.bn2)]  # type: ignore[union-attr]
        z2, tape2 = forward(model, x, True)
    assert tape2 is not None and calls[0] == 3 and tape2.intact()
    assert len(copied) == 2 and gradients._PROTECT[model] == frozenset(copied)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


def test_a_layer_run_twice_gives_logits_and_no_tape_in_one_forward() -> None:
    model, shape = make("shared")
    calls = _forwards(model)
    z, tape = forward(model, torch.rand(2, *shape), True)
    assert tape is None and calls[0] == 1 and z.shape == (2, 3)


def test_recording_is_confined_to_its_thread() -> None:
    """Two threads scoring the same model at once (a server with two batches in flight) each get the
    values they get alone: a layer call on one thread never enters the other's tape."""
    from concurrent.futures import ThreadPoolExecutor

    model, shape = make("resnet")
    xs = [torch.rand(4, *shape, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    alone = [compute(model, x, ["fisher_param_trace"]).scores["fisher_param_trace"] for x in xs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: compute(model, x, ["fisher_param_trace"]).scores["fisher_param_trace"], xs * 4))
    for i, t in enumerate(together):
        torch.testing.assert_close(t, alone[i % len(xs)], rtol=1e-6, atol=0)
