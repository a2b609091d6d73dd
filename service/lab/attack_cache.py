"""Attacked images kept on disk between runs (docs/detection.md#attack-cache).

An attack on the classifier depends on the weights, the images it starts from, its spec and the
attack code; not on the detector or the calibration. So `fisherguard evaluate` and `fit-detector`
keep its 8-bit images under a key of exactly those, and a new decision on the same bundle re-runs
only what depends on the decision: the adaptive attack, which is never kept.
"""

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from service.core.bundle import Bundle
from service.lab.attack_specs import Attack

SOURCES = ("attacks.py", "art_attacks.py", "adaptive.py", "attack_specs.py")  # the code an attack's images depend on


@functools.cache
def code_digest() -> str:
    """sha256 of the attack code (SOURCES): editing any of it retires every kept image."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def attack_key(bundle: Bundle, attack: Attack, x: torch.Tensor, y: torch.Tensor) -> str:
    """What identifies an attack's images: weights, spec, attack code and the exact images (x (N, C, H, W), y (N,))."""
    h = hashlib.sha256(f"{bundle.weights_sha256}|{attack.name}|{code_digest()}|{tuple(x.shape)}".encode())
    h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def kept(attack: Attack) -> bool:
    """The adaptive attack attacks the bundle's decision, which a new calibration or detector changes."""
    return attack.family != "adaptive"


def path_for(cache: Path | None, attack: Attack, key: str) -> Path | None:
    """Where the attack's images under `key` (attack_key) are kept; None without a cache or for an attack that is never kept."""
    if cache is None or not kept(attack):
        return None
    return cache / f"{attack.name.replace(':', '_').replace('/', '-')}-{key}.npz"


def load_or_run(path: Path | None, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The kept images at `path` if there are any, else run() (8-bit quantised, in [0, 1]) and keep them;
    and whether they came from the cache."""
    if path is not None and path.is_file():
        with np.load(path) as z:
            return torch.from_numpy(z["x"]).float().div(255), True
    adv = run()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # written whole, then renamed: no half file, no clash between runs
        np.savez_compressed(tmp, x=(adv * 255).round().byte().numpy())
        tmp.replace(path)
    return adv, False
