"""Making a bundle from a user's classifier (docs/guard-your-classifier.md): an architecture reference
(an installed factory such as `torchvision.models:resnet50` or `timm:create_model` with its
arguments, or a Python file copied into the bundle), weights (safetensors, or a PyTorch state dict
read with `weights_only=True` and converted — never a pickled module), the class names and the input
(size, shorter-side resize and centre crop, mean/std). The model is built, loaded strictly and run
on a dummy batch before anything is written."""

import datetime as dt
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from service.core.bundle import BundleError, build, load_bundle, sha256_file
from service.core.preprocess import Input, wrap

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # torchvision's and timm's ImageNet statistics
TIED = ("calibration.json", "calibration.partial.npz", "mahalanobis.safetensors", "detector.safetensors")  # tied to the weights
STATE_KEYS = ("state_dict", "model", "model_state_dict", "net")  # where training checkpoints commonly keep the weights


@dataclass
class Spec:
    """What `fisherguard bundle create` is given."""

    name: str
    architecture: str  # module:factory, or path/to/file.py:factory (copied into the bundle)
    classes: list[str]
    input: Input
    weights: Path | None = None  # None: the factory's own initialisation (seeded), for trials only
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    version: str = "1.0.0"
    seed: int = 0


def read_classes(path: Path) -> list[str]:
    """Class names in logit order: a text file (one per line), a JSON list, or a JSON object from index
    to a name or to [id, name] (the ImageNet class-index file's form)."""
    text = path.read_text()
    if path.suffix.lower() != ".json":
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        if isinstance(data, list):
            names = [str(v) for v in data]
        elif isinstance(data, dict) and all(str(k).isdigit() for k in data):
            ordered = [data[k] for k in sorted(data, key=int)]
            if sorted(int(k) for k in data) != list(range(len(data))):
                raise ValueError(f"{path}: class indices must be 0..{len(data) - 1}, got {sorted(int(k) for k in data)[:5]}…")
            names = [str(v[-1]) if isinstance(v, list) else str(v) for v in ordered]
        else:
            raise ValueError(f"{path}: expected a list of names or an object from class index to name")
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def read_state(path: Path) -> dict[str, Tensor]:
    """A state dict: safetensors as is; a PyTorch file with `weights_only=True` (tensors and plain
    containers only — a pickled module or any other object is refused), unwrapped from a checkpoint's
    `state_dict`/`model` entry, DataParallel's `module.` prefix removed."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:  # beyond tensors and containers, or not a torch file
        raise ValueError(
            f"{path} is not a state dict that loads with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "save model.state_dict(), not the model"
        ) from None
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"{path}: a mapping whose values are not all tensors, with none of {list(STATE_KEYS)} holding the weights")
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (names to tensors), got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def architecture_in(spec: Spec, root: Path) -> str:
    """The card's architecture: a module reference as given, or a file copied into the bundle as ./<name>."""
    module, _, fn = spec.architecture.rpartition(":")
    if not module.endswith(".py"):
        return spec.architecture
    src = Path(module)
    if not src.is_file():
        raise ValueError(f"architecture file {src} does not exist")
    shutil.copy(src, root / src.name)
    return f"./{src.name}:{fn}"


def create(spec: Spec, root: Path, overwrite: bool = False) -> dict[str, Any]:
    """Writes a bundle to `root` (card.json, model.safetensors and the architecture file if one was
    given) after checking that the model builds, takes the weights strictly and maps a dummy batch of
    the card's input to finite logits, one per class. Everything is made in a staging directory
    beside root and moved in only when it loads: a refusal leaves root as it was. Returns the card."""
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(f"{root} exists and is not empty (pass --force to replace its bundle files)")
    spec.input.check()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        card = _write(spec, staging)
        load_bundle(staging)  # what the service will do: it must succeed
        root.mkdir(exist_ok=True)
        for tied in TIED:  # made for the weights being replaced (--force): they would no longer load
            (root / tied).unlink(missing_ok=True)
        for f in staging.iterdir():
            os.replace(f, root / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def _write(spec: Spec, root: Path) -> dict[str, Any]:
    """The bundle's files in root, after the checks of `create`."""
    card: dict[str, Any] = {
        "name": spec.name,
        "version": spec.version,
        "architecture": architecture_in(spec, root),
        "architecture_args": list(spec.args),
        "architecture_kwargs": dict(spec.kwargs),
        "classes": list(spec.classes),
        "input": spec.input.card(),
    }
    torch.manual_seed(spec.seed)
    try:
        net = build(card, root)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 — the user's factory: whatever it raises is theirs to see
        raise ValueError(f"building {spec.architecture}(*{spec.args}, **{spec.kwargs}) failed: {type(e).__name__}: {e}") from None
    if spec.weights is not None:
        state = read_state(spec.weights)
        try:
            result = net.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ValueError(f"{spec.weights} does not fit {spec.architecture}: {str(e).splitlines()[-1].strip()[:300]}") from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{spec.weights} does not fit {spec.architecture}: missing {result.missing_keys[:5]}"
                f"{'…' if len(result.missing_keys) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
                f"{'…' if len(result.unexpected_keys) > 5 else ''}"
            )
    check_outputs(wrap(net, spec.input).eval(), spec.input, len(spec.classes))
    weights = root / "model.safetensors"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}, str(weights))
    card |= {
        "weights_sha256": sha256_file(weights),
        "weights_source": str(spec.weights) if spec.weights else f"the factory's initialisation, torch.manual_seed({spec.seed})",
        "param_count": sum(p.numel() for p in net.parameters()),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    (root / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def check_outputs(model: torch.nn.Module, spec: Input, k: int) -> None:
    """The model maps (2, C, H, W) in [0, 1] to finite (2, K) logits."""
    x = torch.rand(2, *spec.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            z = model(x)
        except Exception as e:  # noqa: BLE001 — the user's model: whatever it raises is theirs to see
            raise ValueError(f"the model fails on a dummy batch of shape {tuple(x.shape)}: {type(e).__name__}: {e}") from None
    if not isinstance(z, Tensor) or tuple(z.shape) != (2, k):
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"the model maps {tuple(x.shape)} to {shape}; expected logits of shape (2, {k}), one per class")
    if not torch.isfinite(z).all():
        raise ValueError("the model's logits on a dummy batch are not finite")


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, each VALUE as `parse_value` reads it."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--kwarg {item!r} is not KEY=VALUE")
        out[key] = parse_value(value)
    return out


MLSERVER_RUNTIME = "service.mlserver_runtime.FisherGuardRuntime"


def export_mlserver(name_or_path: str | Path, out: Path, name: str | None, max_batch_size: int, max_batch_time_ms: float) -> Path:
    """An MLServer model folder (a Seldon Core 2 model artifact, docs/serving-platforms.md#seldon-core-2):
    the bundle's files and a model-settings.json that runs them on FisherGuard's MLServer runtime.
    The bundle must be calibrated; `out` must not exist or be empty. -> the settings file."""
    bundle = load_bundle(name_or_path)
    if bundle.calibration is None:
        raise BundleError(f"bundle {bundle.path} has no calibration.json: run `fisherguard calibrate --model {bundle.path}` first")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} is not empty")
    if max_batch_size < 1 or max_batch_time_ms < 0:
        raise ValueError(f"max batch size {max_batch_size} must be >= 1 and max batch time {max_batch_time_ms} ms >= 0")
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(bundle.path.iterdir()):
        if f.is_file() and f.suffix not in (".pyc",) and not f.name.endswith(".partial.npz"):
            shutil.copy2(f, out / f.name)
    settings: dict[str, Any] = {
        "name": name or bundle.name,
        "implementation": MLSERVER_RUNTIME,
        "parameters": {"uri": "./", "version": str(bundle.card["version"])},
    }
    if max_batch_size > 1:  # MLServer's adaptive batching: requests merged into one predict call
        settings |= {"max_batch_size": max_batch_size, "max_batch_time": max_batch_time_ms / 1000}
    path = out / "model-settings.json"
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path
