"""`fisherguard train`: a shipped recipe, optionally with the β·tr G_x Fisher penalty (docs/training.md)."""

import argparse
from pathlib import Path

from service.cli import common


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    t = sub.add_parser("train", help="train a bundle with the shipped recipe, optionally with the β·tr G_x Fisher penalty")
    t.add_argument("--bundle", required=True, choices=["mnist", "cifar10"], help="which shipped recipe")
    t.add_argument("--fisher-penalty", type=float, default=0.0, help="β >= 0 (default 0: the shipped bundle's recipe)")
    t.add_argument("--data", type=Path, help="default ../shared/data/mnist.npz or cifar10_jpeg.npz")
    t.add_argument("--out", type=Path, help="default models/<bundle>-fisherreg (β > 0) or models/<bundle>")
    t.add_argument("--epochs", type=int, help="default: the recipe's (mnist 8, cifar10 20)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--arch", choices=["air", "resnet20", "resnet20-wide"], help="cifar10 only: the network (default air, the shipped one)")
    t.add_argument("--batch", type=int, help="batch size (mnist; cifar10's ResNet-20 recipes)")
    t.add_argument("--lr", type=float, help="peak learning rate (mnist; cifar10's ResNet-20 recipes)")
    t.add_argument("--bf16", action="store_true", help="cifar10's ResNet-20 recipes: bf16 autocast (air always uses it)")
    t.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import importlib

    from service.core.bundle import SHIPPED

    if a.fisher_penalty < 0:
        raise ValueError(f"--fisher-penalty must be >= 0, got {a.fisher_penalty}")
    if a.bundle == "mnist" and (a.arch or a.bf16):
        raise ValueError("--arch and --bf16 belong to the cifar10 recipe")
    recipe = importlib.import_module(f"service.lab.training.{a.bundle}")
    out = a.out or SHIPPED / (f"{a.bundle}-fisherreg" if a.fisher_penalty > 0 else a.bundle)
    data = a.data or common.DEFAULT_DATA / ("mnist.npz" if a.bundle == "mnist" else "cifar10_jpeg.npz")
    given = {"epochs": a.epochs, "arch": a.arch, "batch": a.batch, "lr": a.lr, "bf16": a.bf16 or None}
    card = recipe.train(data, out, seed=a.seed, fisher_penalty=a.fisher_penalty, **{k: v for k, v in given.items() if v is not None})
    print(f"wrote {out}: test accuracy {card['test_accuracy']}; calibrate it with: fisherguard calibrate --model {out}")
    return 0
