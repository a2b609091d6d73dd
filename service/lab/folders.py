"""Your own clean images for calibration (docs/guard-your-classifier.md#calibrate): a class-folder
tree (`DIR/<class name>/…`, the layout of torchvision's ImageFolder; folder names are the card's
class names) or a flat folder of unlabelled images (then the model's own predictions stand in for
labels). Files are listed in sorted order, split by the same seeded permutation as every data set
(service.core.splits), decoded batch by batch as the card's input says, and scored with a checkpoint
after every batch, so that a long run that stops resumes where it stopped."""

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.core.bundle import Bundle
from service.core.images import ImageError, decode
from service.core.preprocess import Input
from service.core.scoring import score
from service.core.splits import split_indices

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MAX_PIXELS = 1 << 26


@dataclass(frozen=True)
class Folder:
    """Image files under root (relative, sorted) and their class indices (None: unlabelled)."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...] | None

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def digest(self) -> str:
        """sha256 over every file's relative path and content sha256, in order."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.encode() + b"\0" + hashlib.sha256((self.root / f).read_bytes()).digest())
        return h.hexdigest()

    def split(self, split: str) -> "Folder":
        idx = split_indices(len(self.files), split)
        return Folder(self.root, tuple(self.files[i] for i in idx), tuple(self.labels[i] for i in idx) if self.labels else None)


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def scan(root: Path, classes: Sequence[str]) -> Folder:
    """The folder's images: class folders named as the card's classes, or images directly in root."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not subdirs:
        files = [p for p in _images(root) if p.parent == root]
        if not files:
            raise ValueError(f"{root}: no images ({', '.join(sorted(EXTENSIONS))})")
        return Folder(root, tuple(p.name for p in files), None)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [d.name for d in subdirs if d.name not in index]
    if unknown:
        raise ValueError(
            f"{root}: folders {unknown[:5]}{'…' if len(unknown) > 5 else ''} are not class names of the card (e.g. {list(classes)[:3]})"
        )
    pairs = [(str(p.relative_to(root)), index[d.name]) for d in subdirs for p in _images(d)]
    if not pairs:
        raise ValueError(f"{root}: no images in its class folders")
    return Folder(root, tuple(f for f, _ in pairs), tuple(y for _, y in pairs))


def batches(folder: Folder, spec: Input, size: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, list[int]]]:
    """(batch index, images (n, C, H, W), positions in the folder) from batch `start` on; files that do
    not decode are left out (their positions missing)."""
    for b in range(start, (len(folder.files) + size - 1) // size):
        xs, kept = [], []
        for i in range(b * size, min((b + 1) * size, len(folder.files))):
            try:
                xs.append(decode((folder.root / folder.files[i]).read_bytes(), spec, MAX_PIXELS))
                kept.append(i)
            except (ImageError, OSError) as e:
                print(f"skipping {folder.files[i]}: {e}", file=sys.stderr)
        yield b, (torch.stack(xs) if xs else torch.zeros(0, *spec.shape)), kept


@dataclass
class Scored:
    """Thresholded scores name -> (n,), predictions (n,), positions (n,) of the images that decoded."""

    values: dict[str, np.ndarray]
    predicted: np.ndarray
    positions: np.ndarray


def score_folder(
    bundle: Bundle,
    folder: Folder,
    names: Sequence[str],
    opts: Mapping[str, Any],
    batch_size: int,
    checkpoint: Path,
    show_progress: bool = False,
) -> Scored:
    """Scores every image of the folder, saving what is done to `checkpoint` after each batch and
    starting from it when it was made by the same run (bundle weights, files, scores, options, batch size)."""
    meta = json.dumps(
        {"weights": bundle.weights_sha256, "files": hashlib.sha256("\n".join(folder.files).encode()).hexdigest(),
         "names": list(names), "options": dict(opts), "batch": batch_size},
        sort_keys=True, default=str,
    )  # fmt: skip
    done, parts = _resume(checkpoint, meta)
    total = (len(folder.files) + batch_size - 1) // batch_size
    bar = _bar(total, done, show_progress)
    for b, x, kept in batches(folder, bundle.input, batch_size, done):
        if len(kept):
            r = score(bundle, x, names, (), opts)
            t = r.thresholded()
            parts.append({**{f"v/{k}": t[k] for k in names}, "predicted": r.predicted.numpy(), "positions": np.asarray(kept)})
        _save(checkpoint, meta, b + 1, parts)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    cat = lambda k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)  # noqa: E731
    return Scored(
        {k: cat(f"v/{k}").astype(np.float64) for k in names}, cat("predicted").astype(np.int64), cat("positions").astype(np.int64)
    )


def _resume(path: Path, meta: str) -> tuple[int, list[dict[str, np.ndarray]]]:
    if not path.is_file():
        return 0, []
    with np.load(path) as z:
        if str(z["meta"]) != meta:
            print(f"{path} was made by another run (other files, scores or options): starting again", file=sys.stderr)
            return 0, []
        done = int(z["done"])
        part = {k.removeprefix("a:"): z[k] for k in z.files if k.startswith("a:")}
    print(f"resuming from {path}: {done} batches done", file=sys.stderr)
    return done, [part] if part else []


def _save(path: Path, meta: str, done: int, parts: list[dict[str, np.ndarray]]) -> None:
    """What is done so far, one array per key (so a save costs the same whatever the number of
    batches), written next to the checkpoint and renamed over it."""
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {f"a:{k}": np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    np.savez(tmp, meta=np.array(meta), done=np.array(done), **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _bar(total: int, done: int, on: bool) -> Any:
    if not on:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc="scoring", unit="batch")
