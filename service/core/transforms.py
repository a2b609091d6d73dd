"""Image transforms the detectors apply to an image to see how the prediction responds (squeezers),
and that the laboratory uses as benign controls. (N, C, H, W) in [0, 1] -> the same shape."""

import torch
import torch.nn.functional as F
from torch import Tensor


def bit_depth(x: Tensor, bits: int) -> Tensor:
    """Each value rounded to one of 2^bits levels."""
    levels = 2**bits - 1
    return (x * levels).round() / levels


def median_2x2(x: Tensor) -> Tensor:
    """2×2 median filter (the lower median of the window), same size output."""
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    windows = padded.unfold(2, 2, 1).unfold(3, 2, 1).flatten(-2)  # (N, C, H, W, 4)
    return windows.median(-1).values


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of standard deviation σ pixels (kernel radius ⌈3σ⌉, reflect padding)."""
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c).clamp(0, 1)
