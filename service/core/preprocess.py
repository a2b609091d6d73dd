"""A bundle's input as its card describes it (docs/bundles.md#input): the size the model takes, how
an image of another size gets there — resized to that size, or (ImageNet-style) its shorter side
resized and the centre cropped, as torchvision's `Resize(int)` + `CenterCrop` and timm's eval
transform do — and the per-channel mean/std normalisation, which runs inside the model
(`Normalized`) so that every score, heatmap and attack budget stays in [0, 1] pixel units."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
RESIZES = (*RESAMPLE, "reject")


@dataclass(frozen=True)
class Input:
    """card["input"]: (channels, height, width) the model takes; resize: how other sizes get there
    (or `reject`); resize_shorter: when set, the shorter side is resized to it first, then the centre
    (height, width) cropped; mean/std: per-channel normalisation (in the model); background: the grey
    level transparency is composited on."""

    channels: int
    height: int
    width: int
    resize: str = "bilinear"
    background: int = 0
    resize_shorter: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_card(cls, spec: Mapping[str, Any]) -> "Input":
        try:
            i = cls(
                int(spec["channels"]),
                int(spec["height"]),
                int(spec["width"]),
                str(spec.get("resize", "bilinear")),
                int(spec.get("background", 0)),
                int(spec["resize_shorter"]) if spec.get("resize_shorter") is not None else None,
                tuple(float(v) for v in spec["mean"]) if spec.get("mean") is not None else None,
                tuple(float(v) for v in spec["std"]) if spec.get("std") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"card input {dict(spec)!r} is not valid: {e}") from None
        i.check()
        return i

    def check(self) -> None:
        if self.channels not in (1, 3) or self.height < 1 or self.width < 1:
            raise ValueError(f"card input: channels must be 1 or 3 and the size positive, got {self.shape}")
        if self.resize not in RESIZES:
            raise ValueError(f"card input: resize {self.resize!r} is not one of {list(RESIZES)}")
        if self.resize_shorter is not None and (self.resize == "reject" or self.resize_shorter < min(self.height, self.width)):
            raise ValueError(
                f"card input: resize_shorter {self.resize_shorter} needs a resampling (not 'reject') and at least the crop {self.height}x{self.width}"
            )
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v is not None and len(v) != self.channels:
                raise ValueError(f"card input: {name} {list(v)} needs one value per channel ({self.channels})")
        if (self.mean is None) != (self.std is None) or (self.std is not None and min(self.std) <= 0):
            raise ValueError(f"card input: mean and std go together and std must be positive, got {self.mean}, {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def card(self) -> dict[str, Any]:
        """The card's form: only the fields that are set."""
        out: dict[str, Any] = {"channels": self.channels, "height": self.height, "width": self.width, "resize": self.resize}
        out["background"] = self.background
        if self.resize_shorter is not None:
            out["resize_shorter"] = self.resize_shorter
        if self.mean is not None and self.std is not None:
            out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter` and the aspect kept, the longer side truncated
    to an integer — torchvision's `Resize(int)` rule."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """The centre height × width, offsets rounded as torchvision's `CenterCrop` does (an image smaller
    than the crop is padded with zeros, as there)."""
    w, h = img.size
    if w < width or h < height:
        padded = Image.new(img.mode, (max(w, width), max(h, height)))
        padded.paste(img, ((max(w, width) - w) // 2, (max(h, height) - h) // 2))
        img, (w, h) = padded, padded.size
    top, left = round((h - height) / 2.0), round((w - width) / 2.0)  # Python rounding, as torchvision
    return img.crop((left, top, left + width, top + height))


def fit(img: Image.Image, spec: Input) -> Image.Image:
    """A decoded image (already in the card's mode) brought to the card's size. Raises ValueError for
    another size under resize 'reject'."""
    if spec.resize_shorter is not None:
        size = shorter_side_size(*img.size, spec.resize_shorter)
        if img.size != size:
            img = img.resize(size, RESAMPLE[spec.resize])
        return center_crop(img, spec.height, spec.width)
    if img.size == (spec.width, spec.height):
        return img
    if spec.resize == "reject":
        raise ValueError(f"image is {img.size[0]}x{img.size[1]}, the model takes {spec.width}x{spec.height}")
    return img.resize((spec.width, spec.height), RESAMPLE[spec.resize], reducing_gap=3.0)


class Normalized(nn.Module):
    """x ↦ net((x − mean)/std), x (N, C, H, W) in [0, 1]: a network trained on normalised inputs,
    served on pixels."""

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)  # type: ignore[no-any-return]


def wrap(net: nn.Module, spec: Input) -> nn.Module:
    """The network as the service calls it: behind the card's normalisation when it has one."""
    return Normalized(net, spec.mean, spec.std) if spec.mean is not None and spec.std is not None else net


def network(model: nn.Module) -> nn.Module:
    """The network whose weights model.safetensors holds (inside its normalisation, if any)."""
    return model.net if isinstance(model, Normalized) else model
