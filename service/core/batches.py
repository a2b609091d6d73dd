"""Running a function over a large tensor in batches: the one loop every dataset-sized job uses."""

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

R = TypeVar("R")


def map_batches(fn: Callable[..., R], *tensors: Tensor, batch: int, device: torch.device | str | None = None) -> list[R]:
    """fn on consecutive slices of the tensors (aligned along dim 0), each moved to device first."""
    n = len(tensors[0])
    return [fn(*(t[i : i + batch].to(device) if device is not None else t[i : i + batch] for t in tensors)) for i in range(0, n, batch)]


def cat_batches(fn: Callable[..., Tensor], *tensors: Tensor, batch: int, device: torch.device | str | None = None) -> Tensor:
    """torch.cat of fn over consecutive slices, on the CPU."""
    return torch.cat([r.cpu() for r in map_batches(fn, *tensors, batch=batch, device=device)])


def cat_dicts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """name -> torch.cat over the parts, on the CPU."""
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]} if parts else {}


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def progress(it: range, on: bool, desc: str) -> Iterable[int]:
    """The range with a tqdm bar when asked for and tqdm is installed (the `eval` extra)."""
    if not on:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, unit="batch")  # type: ignore[no-any-return]
