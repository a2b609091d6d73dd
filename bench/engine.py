"""Fisher engine throughput against its cost floor and against peers, in one run.

    python -m bench.engine                      # CPU, 2 threads -> bench/results/engine-cpu.json
    python -m bench.engine --device cuda        # GPU            -> bench/results/engine-cuda.json
    python -m bench.engine --models cifar10 --batches 1,8 --out bench/results/engine-cpu-cifar10.json

Peers for `fisher_param_trace` need BackPACK: `pip install --no-deps backpack-for-pytorch unfoldNd einops`
(its declared torchvision dependency is not used and would replace the pinned torch).

Per model and batch size: images/s of every score and heatmap alone, the floors measured in the
same run (forward + one backward to the input, or to input and parameters; forward + K backward
passes), their ratio, and for `fisher_param_trace` the per-sample per-class loop (the seed paper's
way), torch.func vmap(jacrev), and BackPACK's BatchDiagGGNExact. Medians of interleaved repeats.
"""

import argparse
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from bench.common import environment, interleaved, write
from models.cifar10.model import build as resnet20
from service.bundle import load_bundle
from service.fisher import HEATMAPS, SCORES, compute

FLOOR_OF = {
    "confidence": "forward",
    "entropy": "forward",
    "margin": "forward",
    "sensitivity": "fwd+bwd_x",
    "fisher_input_binary": "fwd+bwd_x",
    "saliency": "fwd+bwd_x",
    "fisher_param_binary": "fwd+bwd_x,θ",
    "fis": "fwd+bwd_x,θ",
    "fisher_input_trace": "fwd+K·bwd_x",
    "fisher_input_eig": "fwd+K·bwd_x",
    "fisher_diag": "fwd+K·bwd_x",
    "eigvec": "fwd+K·bwd_x",
    "fisher_param_trace": "fwd+K·bwd_x,θ",
    "fisher_form": "fwd+K·bwd_x,θ",
    "fisher_noise_kl": "M·forward",
}
NOISE_SAMPLES = 16


def example_cnn() -> nn.Module:
    """The PyTorch MNIST example net (1.2M parameters): the model the research leads timed peers on."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(9216, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def floors(model: nn.Module, x: Tensor, k: int) -> dict[str, Callable[[], Any]]:
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    def fwd_m() -> None:
        with torch.no_grad():
            for _ in range(NOISE_SAMPLES):
                model(x)

    def bwd(targets: str, passes: int) -> Callable[[], None]:
        def run() -> None:
            xr = x.detach().requires_grad_(True)
            z = model(xr)
            inputs = [xr] + (params if "θ" in targets else [])
            for i in range(passes):
                torch.autograd.grad(z[:, i % z.shape[1]].sum(), inputs, retain_graph=i < passes - 1)

        return run

    return {
        "forward": fwd,
        "M·forward": fwd_m,
        "fwd+bwd_x": bwd("x", 1),
        "fwd+bwd_x,θ": bwd("xθ", 1),
        "fwd+K·bwd_x": bwd("x", k),
        "fwd+K·bwd_x,θ": bwd("xθ", k),
    }


def loop_param_trace(model: nn.Module, x: Tensor) -> Tensor:
    """tr F_θ per sample by N·K backward passes of batch 1 (the seed paper's public code does this)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for xn in x:
        log_p = torch.log_softmax(model(xn[None]), 1)[0]
        p = log_p.exp().detach()
        total = torch.zeros(())
        for k in range(len(log_p)):
            g = torch.autograd.grad(log_p[k], params, retain_graph=True)
            total = total + p[k] * sum((t * t).sum() for t in g)
        out.append(total)
    return torch.stack(out)


def vmap_jacrev_param_trace(model: nn.Module, x: Tensor) -> Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def log_p(p: dict[str, Tensor], x1: Tensor) -> Tensor:
        return torch.log_softmax(functional_call(model, (p, buffers), (x1[None],))[0], 0)

    jac = vmap(jacrev(log_p), in_dims=(None, 0))(params, x)  # name -> (N, K, *shape)
    sq = sum(j.flatten(2).pow(2).sum(2) for j in jac.values())  # (N, K)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    return (p * sq).sum(1)


def backpack_param_trace(model: nn.Module, x: Tensor) -> Callable[[], Tensor] | None:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchDiagGGNExact
    except ImportError:
        return None
    ext = extend(copy.deepcopy(model))  # extend() hooks the model for good: keep them off the engine's copy
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def run() -> Tensor:
        z = ext(x)
        y = z.argmax(1)  # the GGN of cross-entropy does not depend on the labels: it is the Fisher
        with backpack(BatchDiagGGNExact()):
            loss_fn(z, y).backward()
        total = sum(p.diag_ggn_exact_batch.flatten(1).sum(1) for p in ext.parameters())
        ext.zero_grad(set_to_none=True)
        return total  # type: ignore[return-value]

    try:
        run()
    except Exception as e:  # noqa: BLE001 - BackPACK refuses modules it has no extension for
        print(f"  backpack unsupported on this model: {type(e).__name__}: {str(e)[:100]}")
        return None
    return run


def without_conv_ghost(model: nn.Module, x: Tensor) -> Tensor:
    """The engine's tr F_θ with the ghost-norm path for convolutions switched off (ablation)."""
    return compute(model, x, ["fisher_param_trace"], conv_ghost=False).scores["fisher_param_trace"]


def bench_model(
    name: str, model: nn.Module, shape: tuple[int, ...], batches: list[int], reps: int, device: str, peers: bool
) -> list[dict[str, Any]]:
    model = model.to(device).eval()
    rows = []
    for n in batches:
        x = torch.rand(n, *shape, device=device, generator=None)
        k = model(x[:1]).shape[1]
        methods: dict[str, Callable[[], Any]] = dict(floors(model, x, k))
        for s in SCORES:
            methods[s] = lambda s=s, x=x: compute(model, x, [s])  # type: ignore[misc]
        for h in HEATMAPS:
            methods[h] = lambda h=h, x=x: compute(model, x, [], [h])  # type: ignore[misc]
        if peers:
            methods["peer:loop fisher_param_trace"] = lambda x=x: loop_param_trace(model, x)  # type: ignore[misc]
            methods["peer:vmap(jacrev) fisher_param_trace"] = lambda x=x: vmap_jacrev_param_trace(model, x)  # type: ignore[misc]
            methods["peer:no conv ghost norms fisher_param_trace"] = lambda x=x: without_conv_ghost(model, x)  # type: ignore[misc]
            bp = backpack_param_trace(model, x)
            if bp is not None:
                methods["peer:backpack BatchDiagGGNExact fisher_param_trace"] = bp
        if peers and n == batches[-1]:
            check_peers(model, x)
        med = interleaved(methods, reps, device)
        for method, sec in med.items():
            floor = FLOOR_OF.get(method.split(" ")[-1] if method.startswith("peer:") else method)
            row = {"model": name, "batch": n, "method": method, "median_s": sec, "images_per_s": n / sec}
            if floor is not None:
                row["floor"] = floor
                row["ratio_to_floor"] = sec / med[floor]
            if method.startswith("peer:"):
                row["speedup_of_engine"] = sec / med["fisher_param_trace"]
            rows.append(row)
        print_table(name, n, rows[-len(med) :])
    return rows


def check_peers(model: nn.Module, x: Tensor) -> None:
    """The peers compute the same numbers as the engine (else the comparison means nothing)."""
    ours = compute(model, x[:4], ["fisher_param_trace"]).scores["fisher_param_trace"].float()
    for fn in (loop_param_trace, vmap_jacrev_param_trace, without_conv_ghost):
        theirs = fn(model, x[:4]).detach().float()
        assert torch.allclose(ours.cpu(), theirs.cpu(), rtol=1e-3), (fn.__name__, ours, theirs)


def print_table(name: str, n: int, rows: list[dict[str, Any]]) -> None:
    print(f"\n{name}, batch {n}")
    for r in rows:
        extra = f"  {r['ratio_to_floor']:.2f}x floor ({r['floor']})" if "ratio_to_floor" in r else ""
        extra += f"  engine {r['speedup_of_engine']:.1f}x faster" if "speedup_of_engine" in r else ""
        print(f"  {r['method']:<52} {r['images_per_s']:>10.1f} img/s{extra}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--models", default="mnist,example-cnn,resnet20", help="any of mnist, example-cnn, resnet20, cifar10")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in a.batches.split(",")]
    models: dict[str, tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = {
        "mnist": ("mnist (shipped, 0.46M, BatchNorm CNN)", lambda: load_bundle("mnist").model, (1, 28, 28)),
        "example-cnn": ("example-cnn (1.2M, conv-conv-9216-128-10)", example_cnn, (1, 28, 28)),
        "resnet20": ("resnet20 (CIFAR size 3x32x32, 0.27M)", resnet20, (3, 32, 32)),
        "cifar10": ("cifar10 (shipped air net, 1.97M, 3x32x32)", lambda: load_bundle("cifar10").model, (3, 32, 32)),
    }
    rows = []
    for key in a.models.split(","):
        if key not in models:
            ap.error(f"unknown model {key!r}: choose from {sorted(models)}")
        name, build, shape = models[key]
        rows += bench_model(name, build(), shape, batches, a.reps, a.device, peers=True)
    out = a.out or Path(__file__).parent / "results" / f"engine-{a.device.split(':')[0]}.json"
    write(out, {"environment": environment(a.device), "reps": a.reps, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
