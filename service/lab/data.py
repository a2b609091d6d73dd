"""Labelled image sets for calibration and evaluation, and the seeded split (docs/detection.md#protocol)."""

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.core.bundle import sha256_file
from service.core.images import decode
from service.core.preprocess import Input
from service.core.splits import split_indices
from service.lab import folders


@dataclass
class Dataset:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (N,) long
    description: str
    sha256: str


def _from_npz(path: Path, split: str = "test", pick: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of an MNIST-style npz (x_<split> uint8 (N, H, W[, C])) or a JPEG npz (<split>_jpeg),
    optionally only the images `pick`."""
    with np.load(path) as d:
        if f"x_{split}" in d:
            xs, ys = d[f"x_{split}"], d[f"y_{split}"]
            xs, ys = (xs[pick], ys[pick]) if pick is not None else (xs, ys)
            x = torch.from_numpy(xs).float().div(255)
            x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
            return x.contiguous(), torch.from_numpy(ys).long()
        if f"{split}_jpeg" in d:
            return jpeg_split(d, split, pick)
    raise ValueError(f"{path}: expected keys x_{split}/y_{split} or {split}_jpeg/{split}_offsets/{split}_labels")


def jpeg_split(d: Mapping[str, np.ndarray], split: str, pick: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The JPEG bytes of one split of a CIFAR-style npz (<split>_jpeg, _offsets, _labels), optionally only
    the images `pick`, decoded -> (N, 3, H, W) float in [0, 1], (N,) labels."""
    raw, off, labels = d[f"{split}_jpeg"], d[f"{split}_offsets"], d[f"{split}_labels"]
    idx = pick if pick is not None else np.arange(len(off) - 1)
    imgs = [np.asarray(Image.open(io.BytesIO(raw[off[i] : off[i + 1]].tobytes())).convert("RGB")) for i in idx]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255)
    return x.contiguous(), torch.from_numpy(labels[idx]).long()


def load_train_subset(path: Path, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of the training split (training files may be sorted by class)."""
    with np.load(path) as d:
        total = len(d["y_train"]) if "y_train" in d else len(d["train_labels"])
    return _from_npz(path, "train", np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False)))


def _from_folder(path: Path, classes: list[str], spec: Input) -> tuple[torch.Tensor, torch.Tensor]:
    """DIR/<class name>/<image files>, listed as service.lab.folders lists them (so that every command
    splits a folder alike), all decoded into memory."""
    folder = folders.scan(path, classes)
    if folder.labels is None:
        raise ValueError(f"{path}: a flat folder has no labels; this command needs class folders named as the card's classes")
    xs = [decode((path / f).read_bytes(), spec, folders.MAX_PIXELS) for f in folder.files]
    return torch.stack(xs), torch.tensor(folder.labels)


def load_dataset(path: Path, split: str, classes: list[str], spec: Input) -> Dataset:
    """Loads the test images of an npz file or a class-folder tree (decoded as the card's input says)
    and takes one half of the seeded split."""
    shape = spec.shape
    if path.is_dir():
        x, y = _from_folder(path, classes, spec)
        digest = "folder"
    else:
        x, y = _from_npz(path)
        digest = sha256_file(path)
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"{path}: images are {tuple(x.shape[1:])}, the model takes {shape}")
    idx = split_indices(len(x), split)
    part = {"calibration-a": "part A of the calibration half", "calibration-b": "part B of the calibration half"}.get(
        split, f"{split} half"
    )
    desc = (
        f"{path.name} test set, {part} of numpy.random.default_rng(0).permutation({len(x)})" if split != "all" else f"{path.name} test set"
    )
    return Dataset(x[idx], y[idx], desc, digest)


def seeded_pick(n: int, limit: int | None) -> np.ndarray:
    """Sorted indices of a seeded random subset of `limit` of n items (all n when limit is None or ≥ n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(1).choice(n, limit, replace=False))


def seeded_subset(data: Dataset, limit: int | None) -> Dataset:
    """At most `limit` images of the set, chosen by `seeded_pick`."""
    if limit is None or limit >= len(data.y):
        return data
    pick = torch.from_numpy(seeded_pick(len(data.y), limit))
    return Dataset(data.x[pick], data.y[pick], f"{data.description}, seeded subset of {limit}", data.sha256)
