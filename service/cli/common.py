"""What several commands share: the default data folder and loading the bundle named by --model."""

import argparse
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path("../shared/data")


def default_data(card: dict[str, Any]) -> Path:
    """../shared/data/<the card's training data file>."""
    return DEFAULT_DATA / str(card.get("training_data", {}).get("file", ""))


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch intra-op threads")


def bundle(a: argparse.Namespace, name: str | None = None):  # type: ignore[no-untyped-def]
    """The bundle named by --model (or `name`), on --device, with --threads applied."""
    import torch

    from service.core.bundle import load_bundle
    from service.core.device import pick_device

    if a.threads:
        torch.set_num_threads(a.threads)
    return load_bundle(name or a.model, pick_device(a.device))
