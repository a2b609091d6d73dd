"""The engine at ImageNet scale (docs/performance.md#imagenet-scale): 3×224×224 inputs, K = 1000,
randomly initialised torchvision ResNet-18 / ResNet-50 and timm DeiT-tiny (a ViT: attention and
LayerNorm go through the torch.func fallback), in one run.

    python -m bench.imagenet                                   # CPU -> bench/results/imagenet-cpu.json
    python -m bench.imagenet --device cuda --batch 64 --out bench/results/imagenet-cuda.json

Per model, at one batch size, interleaved repeats, medians:
- `forward`, and `forward+backward` (the summed cross-entropy to the input and every parameter: one
  training step's gradient);
- `decision family`: the learned detector's features (service.core.features.extract, with the
  shipped CIFAR-10 detector's σ, draws and squeezers) — what the shipped decisions compute per
  image; hookable models only (its per-layer profile needs Linear, Conv2d and BatchNorm layers);
- engine scores alone with the m = 10 most probable classes (`top_classes`), the neglected
  probability mass reported beside them (near 1 on a random network, whose predictions are
  near-uniform; a trained one is peaked);
- the process's peak resident memory while each method runs once (Linux VmHWM, reset before
  each), beside the resident memory before any (model, inputs, the run so far).
"""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import allocator_argument, environment, interleaved, use_allocator, write
from bench.vision import import_timm, import_torchvision
from service.core.bundle import load_bundle
from service.core.features import extract
from service.fisher import compute
from service.fisher.persample import hookable

SCORES = ("sensitivity", "fisher_input_trace", "fisher_input_eig", "fisher_param_trace", "fisher_noise_kl")
TOP = 10


def models() -> dict[str, Callable[[], nn.Module]]:
    def resnet(name: str) -> Callable[[], nn.Module]:
        return lambda: getattr(import_torchvision().models, name)(weights=None)

    def deit() -> nn.Module:
        return import_timm().create_model("deit_tiny_patch16_224", pretrained=False)  # type: ignore[no-any-return]

    return {"resnet18": resnet("resnet18"), "resnet50": resnet("resnet50"), "deit_tiny": deit}


def methods(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], Any]]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        xa = x.clone().requires_grad_(True)
        F.cross_entropy(model(xa), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    out: dict[str, Callable[[], Any]] = {"forward": forward, "forward+backward": forward_backward}
    if hookable(model):
        spec = load_bundle("cifar10").detector.spec  # type: ignore[union-attr]
        out["decision family"] = lambda: extract(model, x, spec, None)
    out |= {s: (lambda s=s: compute(model, x, [s], top_classes=TOP)) for s in SCORES}  # type: ignore[misc]
    return out


def resident_peak_mb() -> float:
    """This process's peak resident set since the last reset (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss_mb(fn: Callable[[], Any]) -> float:
    """The peak resident set while fn runs once: VmHWM reset to the current RSS first (Linux's
    /proc/self/clear_refs, value 5), read after."""
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return resident_peak_mb()


def bench(name: str, batch: int, reps: int, device: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = models()[name]().to(device).eval()
    x = torch.rand(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    ms = methods(model, x, y)
    seconds = interleaved(ms, reps, device)
    print(name, {k: round(v, 2) for k, v in seconds.items()}, "s", flush=True)
    neglected = compute(model, x, ["fisher_input_trace"], top_classes=TOP).neglected_mass
    row: dict[str, Any] = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "hookable": hookable(model),
        "top_classes": TOP,
        "median_neglected_mass": float(neglected.median()),
        "median_s": seconds,
        "over_forward_backward": {k: v / seconds["forward+backward"] for k, v in seconds.items()},
    }
    if device == "cpu":
        row["peak_rss_mb"] = {"before": peak_rss_mb(lambda: None)} | {k: peak_rss_mb(fn) for k, fn in ms.items()}
    else:
        row["peak_cuda_mb"] = {}
        for k, fn in ms.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            row["peak_cuda_mb"][k] = torch.cuda.max_memory_allocated() / 2**20
    print(name, {k: round(v, 2) for k, v in row["over_forward_backward"].items()}, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--models", default="resnet18,resnet50,deit_tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    allocator_argument(ap)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    use_allocator(a.allocator)
    torch.set_num_threads(a.threads)
    rows = [bench(m, a.batch, a.reps, a.device) for m in a.models.split(",")]
    out = a.out or Path("bench/results") / f"imagenet-{a.device.split(':')[0]}.json"
    write(out, {"environment": environment(a.device), "reps": a.reps, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
