"""`fisherguard bundle create`: a bundle from your own classifier (docs/guard-your-classifier.md);
`fisherguard bundle mlserver`: a bundle as an MLServer model folder (docs/serving-platforms.md#seldon-core-2)."""

import argparse
from pathlib import Path

RESIZES = ["bilinear", "bicubic", "lanczos"]


def add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    b = sub.add_parser("bundle", help="make a bundle from a classifier and its weights")
    bsub = b.add_subparsers(dest="bundle_command", required=True)
    c = bsub.add_parser("create", help="write card.json and model.safetensors for a model, after checking it runs")
    c.add_argument("dir", type=Path, help="the bundle directory to write")
    c.add_argument(
        "--architecture",
        required=True,
        help="module:factory (torchvision.models:resnet50, timm:create_model, package.module:fn) or path/to/file.py:fn (copied in)",
    )
    c.add_argument(
        "--arg", action="append", default=[], help="a positional argument of the factory (JSON or a string), e.g. resnet50 for timm"
    )
    c.add_argument(
        "--kwarg", action="append", default=[], metavar="KEY=VALUE", help="a keyword argument of the factory, e.g. num_classes=10"
    )
    w = c.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", type=Path, help=".safetensors, or a PyTorch state dict (.pt/.pth, read with weights_only=True)")
    w.add_argument("--random-init", action="store_true", help="no weights: the factory's initialisation, seeded (for trials)")
    c.add_argument("--classes", type=Path, required=True, help="class names in logit order: text (one per line) or JSON")
    c.add_argument("--name", help="default: the directory's name")
    c.add_argument("--version", default="1.0.0")
    c.add_argument("--preset", choices=["imagenet"], help="imagenet: 224x224 RGB, shorter side 256, bilinear, ImageNet mean/std")
    c.add_argument("--size", help="H or HxW the model takes")
    c.add_argument("--channels", type=int, choices=[1, 3])
    c.add_argument("--resize", choices=[*RESIZES, "reject"], help="resampling (default bilinear), or reject other sizes")
    c.add_argument("--resize-shorter", type=int, help="resize the shorter side to this, then crop the centre to --size")
    c.add_argument("--mean", help="per-channel mean, comma-separated (normalisation runs inside the model)")
    c.add_argument("--std", help="per-channel std, comma-separated")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty directory (its calibration, Mahalanobis fit and detector are removed: they belong to the old weights)",
    )
    c.set_defaults(func=run)
    m = bsub.add_parser("mlserver", help="an MLServer model folder (a Seldon Core 2 artifact) for a calibrated bundle")
    m.add_argument("dir", type=Path, help="the folder to write (must not exist or be empty)")
    m.add_argument("--model", required=True, help="a bundle directory or a shipped bundle's name")
    m.add_argument("--name", help="the model's name in MLServer (default: the bundle's)")
    m.add_argument("--max-batch-size", type=int, default=32, help="MLServer's adaptive batching (1: off)")
    m.add_argument("--max-batch-time-ms", type=float, default=5.0)
    m.set_defaults(func=run_mlserver)


def run(a: argparse.Namespace) -> int:
    from service.core.packaging import IMAGENET, Spec, create, parse_kwargs, parse_value, read_classes
    from service.core.preprocess import Input

    imagenet = a.preset == "imagenet"
    size = a.size or ("224" if imagenet else None)
    if size is None:
        raise ValueError("give --size (H or HxW) or --preset")
    h, _, w = str(size).partition("x")
    floats = lambda v: tuple(float(t) for t in v.split(","))  # noqa: E731
    spec = Input(
        a.channels or 3,
        int(h),
        int(w or h),
        a.resize or "bilinear",
        0,
        a.resize_shorter if a.resize_shorter is not None else (256 if imagenet else None),
        floats(a.mean) if a.mean else (IMAGENET["mean"] if imagenet else None),
        floats(a.std) if a.std else (IMAGENET["std"] if imagenet else None),
    )
    card = create(
        Spec(
            a.name or a.dir.resolve().name,
            a.architecture,
            read_classes(a.classes),
            spec,
            None if a.random_init else a.weights,
            [parse_value(v) for v in a.arg],
            parse_kwargs(a.kwarg),
            a.version,
            a.seed,
        ),
        a.dir,
        a.force,
    )
    print(
        f"wrote {a.dir}: {card['name']} {card['version']}, {card['architecture']}, {len(card['classes'])} classes, "
        f"{card['param_count']:,} parameters, input {spec.card()}; weights sha256 {card['weights_sha256'][:12]}…\n"
        f"next: fisherguard calibrate --model {a.dir} --data <folder of clean images>"
    )
    return 0


def run_mlserver(a: argparse.Namespace) -> int:
    from service.core.packaging import export_mlserver

    path = export_mlserver(a.model, a.dir, a.name, a.max_batch_size, a.max_batch_time_ms)
    print(
        f"wrote {path.parent}: upload it where Seldon Core 2 reads models (the Model's storageUri), or: mlserver start {path.parent.parent}"
    )
    return 0
