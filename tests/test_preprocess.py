"""ImageNet-style input (docs/bundles.md#input): the card's shorter-side resize, centre crop and
mean/std normalisation give exactly what torchvision's and timm's evaluation transforms give on the
same images; the card's input is validated."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.core.images import decode
from service.core.preprocess import Input, Normalized, wrap
from tests.vision import timm, torchvision

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [(300, 200), (200, 300), (256, 256), (257, 301), (640, 480), (225, 224), (1000, 333)]  # (width, height)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for w, h in SIZES:
        ramp = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 55, w))[..., None]  # smooth structure plus noise
        arr = np.clip(ramp + rng.integers(0, 56, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _ours(img: Image.Image, spec: Input) -> torch.Tensor:
    """The service's tensor as the model sees it: decoded from PNG bytes, then normalised."""
    x = decode(_png(img), spec, 1 << 26)[None]
    return Normalized(torch.nn.Identity(), spec.mean, spec.std)(x)[0] if spec.mean else x[0]  # type: ignore[arg-type]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_card_preprocesses_as_torchvision_resize_center_crop_normalize(interpolation: str) -> None:
    tv = torchvision()
    t = tv.transforms
    mode = {"bilinear": t.InterpolationMode.BILINEAR, "bicubic": t.InterpolationMode.BICUBIC}[interpolation]
    reference = t.Compose([t.Resize(256, interpolation=mode), t.CenterCrop(224), t.ToTensor(), t.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    spec = Input(3, 224, 224, interpolation, 0, 256, IMAGENET_MEAN, IMAGENET_STD)
    for img in _images():
        ours, theirs = _ours(img, spec), reference(img)
        assert ours.shape == theirs.shape == (3, 224, 224)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # the same pixels; float rounding of the normalisation only


@pytest.mark.parametrize("arch", ["resnet50", "deit_tiny_patch16_224"])
def test_the_card_preprocesses_as_timms_eval_transform(arch: str) -> None:
    tm = timm()
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=tm.create_model(arch, pretrained=False))
    reference = create_transform(**cfg)
    shorter = int(np.floor(cfg["input_size"][1] / cfg["crop_pct"]))  # timm's scale size for a square crop
    _, height, width = cfg["input_size"]
    spec = Input(3, height, width, cfg["interpolation"], 0, shorter, tuple(cfg["mean"]), tuple(cfg["std"]))
    for img in _images():
        torch.testing.assert_close(_ours(img, spec), reference(img), rtol=0, atol=1e-6)


def test_the_normalisation_runs_inside_the_model_and_reload_loads_the_network_inside() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    spec = Input(3, 2, 2, "bilinear", 0, None, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    model = wrap(net, spec)
    x = torch.rand(5, 3, 2, 2)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), net((x - mean) / std))
    assert set(model.state_dict()) == {f"net.{k}" for k in net.state_dict()}  # mean/std are the card's, not weights
    assert wrap(net, Input(3, 2, 2)) is net


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"channels": 2, "height": 8, "width": 8}, "channels must be 1 or 3"),
        ({"channels": 3, "height": 8, "width": 8, "resize": "nearest"}, "resize 'nearest'"),
        ({"channels": 3, "height": 224, "width": 224, "resize_shorter": 200}, "resize_shorter 200"),
        ({"channels": 3, "height": 8, "width": 8, "mean": [0.5, 0.5], "std": [1, 1, 1]}, "mean [0.5, 0.5]"),
        ({"channels": 3, "height": 8, "width": 8, "mean": [0.5, 0.5, 0.5]}, "mean and std go together"),
        ({"channels": 3, "height": 8, "width": 8, "mean": [0, 0, 0], "std": [1, 0, 1]}, "std must be positive"),
        ({"height": 8, "width": 8}, "'channels'"),
    ],
)
def test_a_bad_card_input_is_refused_quoting_it(spec: dict, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match="card input") as e:
        Input.from_card(spec)
    assert fragment in str(e.value)


def test_the_card_form_round_trips() -> None:
    spec = Input(3, 224, 224, "bicubic", 0, 248, IMAGENET_MEAN, IMAGENET_STD)
    assert Input.from_card(spec.card()) == spec
    assert Input.from_card({"channels": 1, "height": 28, "width": 28}).card() == {
        "channels": 1,
        "height": 28,
        "width": 28,
        "resize": "bilinear",
        "background": 0,
    }
