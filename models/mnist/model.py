"""The shipped MNIST classifier: a small BatchNorm CNN (about 0.46M parameters)."""

import torch
from torch import Tensor, nn

MEAN, STD = 0.1307, 0.3081


class Normalize(nn.Module):
    """Maps images in [0, 1] to the standardised range the network was trained on."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that pools forward-only passes (no gradient wanted: the detector's copies) in
    channels-last memory and hands them on in the usual layout: the same values, bit for bit
    (tests/test_bundle.py). PyTorch's CPU max-pool kernel is vectorised over channels only in
    channels-last (docs/performance.md#decision-cost). Passes to differentiate stay NCHW."""

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # a pass to differentiate stays NCHW
            return super().forward(x)
        try:
            nhwc = x.contiguous(memory_format=torch.channels_last)
        except RuntimeError:  # inside torch.func.vmap, which keeps one memory format: pool as it comes
            return super().forward(x)
        return super().forward(nhwc).contiguous()


def build() -> nn.Module:
    """(N, 1, 28, 28) images in [0, 1] -> (N, 10) logits."""
    return nn.Sequential(
        Normalize(MEAN, STD),
        nn.Conv2d(1, 32, 5, padding=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        MaxPool2d(2),  # (N, 32, 14, 14)
        nn.Conv2d(32, 64, 5, padding=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        MaxPool2d(2),  # (N, 64, 7, 7)
        nn.Flatten(),  # (N, 3136)
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, 10),  # (N, 10)
    )
