"""Small classifiers for the numerics tests: an MLP with tanh, a BatchNorm CNN with softplus, a ReLU
residual net (with in-place ops), the shipped CIFAR-10 architecture at tiny widths (GELU, max-pooling,
residual groups), and a model that reuses a layer (weight sharing)."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.cifar10.model import AirResNet


class MLP(nn.Sequential):
    def __init__(self, c: int = 1, hw: int = 6, k: int = 5) -> None:
        super().__init__(nn.Flatten(), nn.Linear(c * hw * hw, 16), nn.Tanh(), nn.Linear(16, k))


class BNCNN(nn.Sequential):
    def __init__(self, c: int = 3, hw: int = 8, k: int = 6) -> None:
        super().__init__(
            nn.Conv2d(c, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Softplus(),
            nn.Conv2d(4, 6, 3, stride=2),
            nn.BatchNorm2d(6),
            nn.Softplus(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(12),
            nn.BatchNorm1d(12),
            nn.Softplus(),
            nn.Linear(12, k),
        )
        self(torch.zeros(2, c, hw, hw))  # materialise the lazy layer


class Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        self.conv2, self.bn2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x  # in place on a recorded BatchNorm output
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, c: int = 3, hw: int = 8, k: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c, 5, 3, padding=1)
        self.block = Block(5)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(5 * (hw // 2) ** 2, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.block(torch.relu(self.stem(x)))).flatten(1))


class Shared(nn.Module):
    """Applies one Linear twice: the per-layer identities do not hold, the torch.func path must."""

    def __init__(self, c: int = 1, hw: int = 4, k: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(c * hw * hw, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, k)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x.flatten(1)))
        h = torch.tanh(self.mid(torch.tanh(self.mid(h))))
        return self.out(h)


def randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)


def make(name: str, seed: int = 0) -> tuple[nn.Module, tuple[int, int, int]]:
    """A small model in eval mode with random BatchNorm statistics, and its input shape."""
    torch.manual_seed(seed)
    builders: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
        "mlp": (MLP, (1, 6, 6)),
        "bncnn": (BNCNN, (3, 8, 8)),
        "resnet": (ResNet, (3, 8, 8)),
        "air": (lambda: AirResNet(num_classes=5, widths=(3, 4, 5)), (3, 32, 32)),
        "shared": (Shared, (1, 4, 4)),
    }
    model, shape = builders[name]
    m = model()
    randomise_batchnorm(m, torch.Generator().manual_seed(seed))
    return m.eval(), shape
