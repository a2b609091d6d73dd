"""Model bundles (docs/bundles.md): a directory with card.json, model.safetensors, calibration.json,
and architecture code importable as `module:factory` (or `./file.py:factory` inside the bundle)."""

import functools
import hashlib
import importlib
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from service.core.baselines import Mahalanobis, available
from service.core.calibration import Calibration
from service.core.learned import SCORES as LEARNED
from service.core.learned import LearnedDetector
from service.core.preprocess import Input, wrap
from service.core.preprocess import network as network_of
from service.core.scores import ENGINE, SCORES, ScoreSpec

SHIPPED = Path(__file__).resolve().parents[2] / "models"
REQUIRED_CARD = ("name", "version", "architecture", "classes", "input")


class BundleError(ValueError):
    """A bundle that cannot be served, with the reason."""


@dataclass
class Bundle:
    path: Path
    card: dict[str, Any]
    model: nn.Module
    weights_sha256: str
    calibration: Calibration | None
    mahalanobis: Mahalanobis | None = None  # the Mahalanobis baseline's fit, when the bundle has one
    detector: LearnedDetector | None = None  # the learned detector, when the bundle has one

    @property
    def scores(self) -> dict[str, ScoreSpec]:
        """Every score this bundle can compute: the engine's, those of its clean-data detectors and of its
        learned detector."""
        return {k: SCORES[k] for k in (*ENGINE, *available(self.mahalanobis), *(LEARNED if self.detector else ()))}

    @property
    def name(self) -> str:
        return str(self.card["name"])

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @functools.cached_property
    def input(self) -> Input:
        """The card's input: size, resizing, normalisation (docs/bundles.md#input); parsed once, as the
        request path reads it for every image."""
        return Input.from_card(self.card["input"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.input.shape


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve(name_or_path: str | Path) -> Path:
    """A directory path as given, or the shipped bundle of that name under models/."""
    p = Path(name_or_path)
    if p.is_dir():
        return p.resolve()
    if re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", str(name_or_path)) and (SHIPPED / str(name_or_path) / "card.json").is_file():
        return SHIPPED / str(name_or_path)
    shipped = sorted(d.name for d in SHIPPED.iterdir() if (d / "card.json").is_file())
    raise BundleError(f"no bundle {str(name_or_path)!r}: not a directory and not a shipped bundle {shipped}")


def _factory(spec: str, root: Path) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise BundleError(f"architecture {spec!r} must be 'module:factory' or './file.py:factory'")
    if module_name.startswith("./"):
        file = (root / module_name).resolve()
        if root not in file.parents or not file.is_file():
            raise BundleError(f"architecture file {module_name!r} is not a file inside the bundle {root}")
        loader = importlib.util.spec_from_file_location(f"fisherguard_bundle_{root.name}", file)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BundleError(f"architecture {spec!r}: {attr!r} is not a callable in {module_name!r}")
    return factory  # type: ignore[no-any-return]


def read_card(root: Path) -> dict[str, Any]:
    card_path = root / "card.json"
    if not card_path.is_file():
        raise BundleError(f"bundle {root} has no card.json")
    card: dict[str, Any] = json.loads(card_path.read_text())
    missing = [k for k in REQUIRED_CARD if k not in card]
    if missing:
        raise BundleError(f"card.json of {root} lacks {missing}")
    return card


def read_weights(root: Path, card: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """model.safetensors and its sha256, checked against the card's when it names one."""
    weights = root / "model.safetensors"
    if not weights.is_file():
        raise BundleError(f"bundle {root} has no model.safetensors (weights are only read from safetensors)")
    digest = sha256_file(weights)
    if card.get("weights_sha256") not in (None, digest):
        raise BundleError(f"model.safetensors has sha256 {digest}, card.json says {card['weights_sha256']}")
    return load_file(str(weights)), digest


def load_model(root: Path, card: dict[str, Any]) -> tuple[nn.Module, str]:
    """The card's network with model.safetensors in it, behind the card's normalisation."""
    try:
        spec = Input.from_card(card["input"])
    except ValueError as e:
        raise BundleError(f"card.json of {root}: {e}") from None
    state, digest = read_weights(root, card)
    net = build(card, root)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"model.safetensors of {root} does not fit {card['architecture']!r}: {e}") from None
    return wrap(net, spec).eval(), digest


def build(card: dict[str, Any], root: Path) -> nn.Module:
    """The card's architecture, built: factory(*architecture_args, **architecture_kwargs)."""
    factory = _factory(str(card["architecture"]), root)
    args, kwargs = card.get("architecture_args", []), card.get("architecture_kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise BundleError(f"card.json of {root}: architecture_args must be a list and architecture_kwargs an object")
    net = factory(*args, **kwargs)
    if not isinstance(net, nn.Module):
        raise BundleError(f"architecture {card['architecture']!r} returned {type(net).__name__}, not an nn.Module")
    return net


def _tied(path: Path, made_for: str, digest: str, remedy: str) -> None:
    """A file that belongs to one set of weights must name them: else a BundleError quoting both."""
    if made_for != digest:
        raise BundleError(f"{path} was made for weights with sha256 {made_for!r}, but model.safetensors has sha256 {digest}: {remedy}")


def load_calibration(root: Path, digest: str) -> Calibration | None:
    path = root / "calibration.json"
    if not path.is_file():
        return None
    cal = Calibration.load(path)
    _tied(path, cal.weights_sha256, digest, "recalibrate with `fisherguard calibrate`")
    return cal


def load_bundle(name_or_path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Loads a bundle: `mnist` / `cifar10` by name, or a directory."""
    root = resolve(name_or_path)
    card = read_card(root)
    model, digest = load_model(root, card)
    for p in model.parameters():
        p.requires_grad_(True)
    return Bundle(
        root, card, model.to(device), digest, load_calibration(root, digest), load_mahalanobis(root, digest), load_detector(root, digest)
    )


RELOAD_FIXED = (
    "name",
    "architecture",
    "architecture_args",
    "architecture_kwargs",
    "input",
)  # what a reload cannot change: routes, code and shapes depend on them


def reload_bundle(served: Bundle, network: nn.Module) -> Bundle:
    """The served bundle's directory read again — card, weights, calibration, Mahalanobis fit, learned
    detector — into `network`, a copy of the served network: the architecture code imported at start
    is reused, never imported anew. A card that changes name, architecture or input is refused."""
    root = served.path
    card = read_card(root)
    changed = [k for k in RELOAD_FIXED if card.get(k) != served.card.get(k)]
    if changed:
        raise BundleError(
            f"card.json of {root} changes {changed} ({[served.card[k] for k in changed]} -> {[card[k] for k in changed]}); only a restart serves another architecture"
        )
    state, digest = read_weights(root, card)
    try:
        network_of(network).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"model.safetensors of {root} does not fit the served architecture: {e}") from None
    for p in network.parameters():
        p.requires_grad_(True)
    return Bundle(
        root, card, network.eval(), digest, load_calibration(root, digest), load_mahalanobis(root, digest), load_detector(root, digest)
    )


def load_mahalanobis(root: Path, digest: str) -> Mahalanobis | None:
    path = root / "mahalanobis.safetensors"
    if not path.is_file():
        return None
    fit, made_for = Mahalanobis.load(path)
    _tied(path, made_for, digest, "refit with `fisherguard calibrate --fit-mahalanobis N`")
    return fit


def load_detector(root: Path, digest: str) -> LearnedDetector | None:
    path = root / "detector.safetensors"
    if not path.is_file():
        return None
    detector, made_for = LearnedDetector.load(path)
    _tied(path, made_for, digest, "train it again with `fisherguard fit-detector`")
    return detector
