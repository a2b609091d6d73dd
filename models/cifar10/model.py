"""CIFAR-10 classifiers: ResNet-20 (He et al. 2016, option A shortcuts replaced by 1×1 projections; ~0.27M parameters)
and the shipped airbench-style residual net (AirResNet, ~1.97M)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    mean: Tensor
    std: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """(N, 3, 32, 32) images in [0, 1] -> (N, 10) logits."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.norm = Normalize(MEAN, STD)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(3):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)  # (N, 64, 8, 8)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(self.stem(self.norm(x)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))  # (N, K)


def build() -> nn.Module:
    return ResNet20()


def build_wide() -> nn.Module:
    """Twice the width (32-64-128 channels, as in WRN-20-2): ~1.08M parameters, ~4× the compute."""
    return ResNet20(width=32)


class ConvGroup(nn.Module):
    """conv 3×3 → max-pool 2 → BN → GELU, then a residual conv 3×3 → BN → GELU: (N, cin, H, W) -> (N, cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return h + F.gelu(self.bn2(self.conv2(h)))


class AirResNet(nn.Module):
    """The airbench94 network (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds") with a residual second conv
    per group: a 2×2 patch-whitening conv (24 channels) → GELU → three ConvGroups (64-256-256) →
    max-pool 3 → linear (no bias) scaled by 1/9. (N, 3, 32, 32) images in [0, 1] -> (N, 10) logits;
    ~1.97M parameters, ~0.12 GMACs per image (3× ResNet-20) but wide convolutions that run fast on CPU."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        self.norm = Normalize(MEAN, STD)
        self.whiten = nn.Conv2d(3, 24, 2)  # (N, 24, 31, 31); set from data by whiten_from
        self.groups = nn.Sequential(ConvGroup(24, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.groups(F.gelu(self.whiten(self.norm(x))))  # (N, 256, 3, 3)
        return self.head(F.max_pool2d(h, 3).flatten(1)) / 9  # (N, K)


def build_air() -> nn.Module:
    return AirResNet()
