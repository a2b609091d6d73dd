"""Attacks and benign controls by their command-line spec (docs/detection.md#attacks): a kind and its
parameters in order, each optional one with a default — `pgd_linf:8/255`, `pgd_linf:8/255:10`,
`cw:5`, `deepfool:0.1`, `art_apgd:8/255:dlr`, `blur:0.7`. Numbers may be fractions (8/255)."""

import io
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from service.core.bundle import Bundle
from service.core.calibration import Component
from service.core.transforms import gaussian_blur
from service.lab import adaptive, art_attacks, attacks

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Attack:
    name: str
    run: AttackFn
    control: bool = False  # a benign change of clean images (noise, JPEG, blur, …): all kept, flag rate ≈ α expected
    family: str = ""  # what a detector that learned from attacks may have seen: the kind, ART's attacks apart


@dataclass(frozen=True)
class Kind:
    """One kind of spec: its parameters (name, default or None when required; a str default means a
    word parameter) and how it runs."""

    params: tuple[tuple[str, float | str | None], ...]
    make: Callable[..., AttackFn]
    control: bool = False
    family: str = ""


def number(arg: str) -> float:
    try:
        return float(Fraction(arg))
    except ValueError:
        raise ValueError(f"{arg!r} is not a number (fractions such as 8/255 are fine)") from None


def uniform_noise(x: Tensor, eps: float) -> Tensor:
    """x + U(−ε, ε) per pixel (seeded), clipped to [0, 1]."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return (x + (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * eps).clamp(0, 1)


def gaussian_noise(x: Tensor, sigma: float) -> Tensor:
    """x + N(0, σ²) per pixel (seeded), clipped to [0, 1]."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    return (x + torch.randn(x.shape, generator=gen).to(x.device) * sigma).clamp(0, 1)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """Each image through an 8-bit JPEG file of the given quality."""
    out = []
    for img in (x.clamp(0, 1) * 255).round().byte().cpu():
        arr = img.permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, "JPEG", quality=quality)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
        out.append(torch.from_numpy(dec.reshape(arr.shape)).permute(2, 0, 1))
    return torch.stack(out).to(x.device)


def contrast(x: Tensor, factor: float) -> Tensor:
    """Contrast scaled by `factor` about each image's mean."""
    mean = x.mean((1, 2, 3), keepdim=True)
    return (mean + factor * (x - mean)).clamp(0, 1)


def brightness(x: Tensor, delta: float) -> Tensor:
    return (x + delta).clamp(0, 1)


def _i(v: float | str) -> int:
    return int(float(v))


KINDS: dict[str, Kind] = {
    "fgsm": Kind((("eps", None),), lambda eps: lambda m, x, y: attacks.fgsm(m, x, y, eps), family="fgsm"),
    "pgd_linf": Kind(
        (("eps", None), ("steps", 40)), lambda eps, steps: lambda m, x, y: attacks.pgd_linf(m, x, y, eps, _i(steps)), family="pgd_linf"
    ),
    "pgd_l2": Kind(
        (("eps", None), ("steps", 40)), lambda eps, steps: lambda m, x, y: attacks.pgd_l2(m, x, y, eps, _i(steps)), family="pgd_l2"
    ),
    "cw": Kind(
        (("kappa", None), ("steps", 100), ("search", 6)),
        lambda k, steps, search: lambda m, x, y: attacks.cw_l2(m, x, y, kappa=k, steps=_i(steps), search=_i(search)),
        family="cw",
    ),
    "deepfool": Kind(
        (("overshoot", 0.02), ("steps", 50)), lambda o, steps: lambda m, x, y: attacks.deepfool(m, x, y, _i(steps), o), family="deepfool"
    ),
    "square": Kind(
        (("eps", None), ("queries", 1000)), lambda eps, q: lambda m, x, y: attacks.square_linf(m, x, y, eps, _i(q)), family="square"
    ),
    "ossa": Kind((("eps", None),), lambda eps: lambda m, x, y: attacks.ossa(m, x, y, eps), family="ossa"),
    "art_apgd": Kind(
        (("eps", None), ("loss", "ce"), ("steps", 100)),
        lambda eps, loss, steps: lambda m, x, y: art_attacks.apgd(m, x, y, eps, str(loss), _i(steps)),
        family="art_apgd",
    ),
    "art_cw": Kind(
        (("confidence", 0.0), ("steps", 100), ("search", 6)),
        lambda c, steps, search: lambda m, x, y: art_attacks.cw(m, x, y, c, _i(steps), _i(search)),
        family="art_cw",
    ),
    "art_deepfool": Kind(
        (("overshoot", 1e-6), ("steps", 100)),
        lambda o, steps: lambda m, x, y: art_attacks.deepfool(m, x, y, o, _i(steps)),
        family="art_deepfool",
    ),
    "art_square": Kind(
        (("eps", None), ("queries", 1000)), lambda eps, q: lambda m, x, y: art_attacks.square(m, x, y, eps, _i(q)), family="art_square"
    ),
    "art_hsj": Kind((("steps", 20),), lambda steps: lambda m, x, y: art_attacks.hop_skip_jump(m, x, y, _i(steps)), family="art_hsj"),
    "noise": Kind((("eps", None),), lambda eps: lambda m, x, y: uniform_noise(x, eps), control=True, family="noise"),
    "gnoise": Kind((("sigma", None),), lambda s: lambda m, x, y: gaussian_noise(x, s), control=True, family="gnoise"),
    "jpeg": Kind((("quality", None),), lambda q: lambda m, x, y: jpeg(x, _i(q)), control=True, family="jpeg"),
    "blur": Kind((("sigma", None),), lambda s: lambda m, x, y: gaussian_blur(x, s), control=True, family="blur"),
    "contrast": Kind((("factor", None),), lambda f: lambda m, x, y: contrast(x, f), control=True, family="contrast"),
    "brightness": Kind((("delta", None),), lambda d: lambda m, x, y: brightness(x, d), control=True, family="brightness"),
}
ADAPTIVE = {"adaptive": "linf", "adaptive_l2": "l2"}  # EPS[:KAPPA], against the bundle's own decision
ATTACK_HELP = (
    ", ".join(f"{k}:" + ":".join(n.upper() if d is None else f"[{n.upper()}]" for n, d in kind.params) for k, kind in KINDS.items())
    + ", adaptive:EPS[:KAPPA], adaptive_l2:EPS[:KAPPA]; numbers may be fractions such as 8/255"
)


def parse_attack(spec: str, bundle: Bundle | None = None) -> Attack:
    """An attack (or control) from its command-line spec; see ATTACK_HELP."""
    kind, *args = spec.split(":")
    if kind in ADAPTIVE:
        if not 1 <= len(args) <= 2:
            raise ValueError(f"{spec!r}: {kind} takes EPS[:KAPPA]")
        eps, kappa = number(args[0]), number(args[1]) if len(args) == 2 else 2.0
        return Attack(spec, _adaptive(bundle, eps, ADAPTIVE[kind], kappa), family="adaptive")
    if kind not in KINDS:
        raise ValueError(f"unknown attack {spec!r}; known: {ATTACK_HELP}")
    k = KINDS[kind]
    if len(args) > len(k.params) or (args == [""] and k.params):
        raise ValueError(f"{spec!r}: {kind} takes {':'.join(n for n, _ in k.params)}")
    values: list[float | str] = []
    for i, (name, default) in enumerate(k.params):
        if i < len(args) and args[i] != "":
            values.append(args[i] if isinstance(default, str) else number(args[i]))
        elif default is None:
            raise ValueError(f"{spec!r}: {kind} needs {name.upper()}; known: {ATTACK_HELP}")
        else:
            values.append(default)
    return Attack(spec, k.make(*values), k.control, k.family)


def _adaptive(bundle: Bundle | None, eps: float, norm: str, kappa: float) -> AttackFn:
    """PGD (L∞ or L2) against the bundle's whole decision: every component held inside its clean range."""
    cal = bundle.calibration if bundle else None
    if bundle is None or cal is None:
        raise ValueError("the adaptive attack needs a calibrated bundle: it attacks the bundle's decision")
    components = cal.combination.components if cal.combination else (Component(cal.statistic, cal.tail),)
    noise = {k: cal.score_options[k] for k in ("noise_sigma", "noise_samples") if k in cal.score_options}
    penalty = adaptive.decision_penalty(adaptive.targets(cal.values, components, bundle.mahalanobis, detector=bundle.detector, **noise))
    return lambda m, x, y: adaptive.adaptive_pgd(m, x, y, eps, penalty, kappa=kappa, norm=norm)
