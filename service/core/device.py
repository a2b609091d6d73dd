"""Which torch device to run on: `auto` takes the GPU when there is one."""

import torch


def pick_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu; `cuda` asked for without CUDA is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
