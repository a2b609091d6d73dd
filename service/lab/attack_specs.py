"""Attacks and benign controls by their command-line spec (docs/detection.md#attacks), e.g. `pgd_linf:8/255`."""

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
from service.lab import adaptive, attacks

AttackFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
ATTACK_HELP = (
    "fgsm:EPS, pgd_linf:EPS, pgd_l2:EPS, cw:KAPPA, deepfool, square:EPS, ossa:EPS, adaptive:EPS[:KAPPA], adaptive_l2:EPS[:KAPPA] "
    "(controls: noise:EPS, jpeg:QUALITY); EPS may be a fraction such as 8/255"
)


@dataclass(frozen=True)
class Attack:
    name: str
    run: AttackFn
    control: bool = False  # a benign change of clean images (noise, JPEG): all kept, flag rate ≈ α expected


def number(arg: str) -> float:
    try:
        return float(Fraction(arg))
    except ValueError:
        raise ValueError(f"{arg!r} is not a number (fractions such as 8/255 are fine)") from None


def uniform_noise(x: Tensor, eps: float) -> Tensor:
    """x + U(−ε, ε) per pixel (seeded), clipped to [0, 1]."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return (x + (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * eps).clamp(0, 1)


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


def parse_attack(spec: str, bundle: Bundle | None = None) -> Attack:
    """An attack (or control) from its command-line spec; see ATTACK_HELP."""
    kind, _, arg = spec.partition(":")
    if kind in ("adaptive", "adaptive_l2") and arg.count(":") == 1:  # with the logit margin κ the attacker asks for
        eps, kappa = (number(a) for a in arg.split(":"))
        return Attack(spec, _adaptive(bundle, eps, "l2" if kind == "adaptive_l2" else "linf", kappa))
    v = number(arg) if arg else None
    table: dict[str, Callable[[float], Attack]] = {
        "fgsm": lambda e: Attack(spec, lambda m, x, y: attacks.fgsm(m, x, y, e)),
        "pgd_linf": lambda e: Attack(spec, lambda m, x, y: attacks.pgd_linf(m, x, y, e)),
        "pgd_l2": lambda e: Attack(spec, lambda m, x, y: attacks.pgd_l2(m, x, y, e)),
        "cw": lambda k: Attack(spec, lambda m, x, y: attacks.cw_l2(m, x, y, kappa=k)),
        "square": lambda e: Attack(spec, lambda m, x, y: attacks.square_linf(m, x, y, e)),
        "ossa": lambda e: Attack(spec, lambda m, x, y: attacks.ossa(m, x, y, e)),
        "adaptive": lambda e: Attack(spec, _adaptive(bundle, e, "linf", 2.0)),
        "adaptive_l2": lambda e: Attack(spec, _adaptive(bundle, e, "l2", 2.0)),
        "noise": lambda e: Attack(spec, lambda m, x, y: uniform_noise(x, e), control=True),
        "jpeg": lambda q: Attack(spec, lambda m, x, y: jpeg(x, int(q)), control=True),
    }
    if kind == "deepfool" and v is None:
        return Attack(spec, lambda m, x, y: attacks.deepfool(m, x, y))
    if kind in table and v is not None:
        return table[kind](v)
    raise ValueError(f"unknown attack {spec!r}; known: {ATTACK_HELP}")


def _adaptive(bundle: Bundle | None, eps: float, norm: str, kappa: float) -> AttackFn:
    """PGD (L∞ or L2) against the bundle's whole decision: every component held inside its clean range."""
    cal = bundle.calibration if bundle else None
    if bundle is None or cal is None:
        raise ValueError("the adaptive attack needs a calibrated bundle: it attacks the bundle's decision")
    components = cal.combination.components if cal.combination else (Component(cal.statistic, cal.tail),)
    penalty = adaptive.decision_penalty(adaptive.targets(cal.values, components, bundle.mahalanobis))
    return lambda m, x, y: adaptive.adaptive_pgd(m, x, y, eps, penalty, kappa=kappa, norm=norm)
