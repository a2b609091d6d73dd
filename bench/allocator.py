"""What the memory allocator does to large-tensor work (docs/deployment.md#memory).

    python -m bench.allocator                  # -> bench/results/allocator-cpu.json

A randomly initialised torchvision ResNet-50, 3×224×224, batch 16, two torch threads: forward and
forward+backward, each in a fresh process per allocator — glibc's malloc, jemalloc as the service
starts it (freed pages kept: service.serve.allocator.CONF), and jemalloc on its default 10 s decay —
with the minor page faults each pass takes (getrusage). The variants take turns, repeat by repeat;
medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import environment, write
from service.serve import allocator

VARIANTS: dict[str, dict[str, str]] = {
    "glibc": {"FISHERGUARD_BENCH_ALLOCATOR": "system"},
    "jemalloc, pages kept (the service's)": {"FISHERGUARD_BENCH_ALLOCATOR": "jemalloc"},
    "jemalloc, its default 10 s decay": {"FISHERGUARD_BENCH_ALLOCATOR": "jemalloc", "MALLOC_CONF": ""},
}

CHILD = """
import json, os, resource, sys, time
from service.serve import allocator
allocator.ensure(os.environ["FISHERGUARD_BENCH_ALLOCATOR"])
import torch, torch.nn.functional as F
from bench.vision import import_torchvision
torch.set_num_threads(2)
torch.manual_seed(0)
model = import_torchvision().models.resnet50(weights=None).eval()
x, y = torch.rand(16, 3, 224, 224), torch.randint(0, 1000, (16,))
def forward():
    with torch.no_grad():
        model(x)
def forward_backward():
    xa = x.clone().requires_grad_(True)
    F.cross_entropy(model(xa), y, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
out = {"allocator": allocator.in_use()}
for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
    fn()
    runs = []
    for _ in range(int(sys.argv[1])):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    out[name] = {"seconds": sorted(r[0] for r in runs)[len(runs) // 2], "minor_faults": sorted(r[1] for r in runs)[len(runs) // 2]}
print(json.dumps(out))
"""


def measure(env: dict[str, str], passes: int) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.TRIED)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(passes)], env=clean | env, capture_output=True, text=True, check=True, timeout=900
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", type=int, default=3, help="timed passes per process (after one untimed)")
    p.add_argument("--out", type=Path, default=Path("bench/results/allocator-cpu.json"))
    a = p.parse_args()
    if allocator.find_jemalloc() is None:
        raise SystemExit("no libjemalloc.so.2 on this machine (apt-get install libjemalloc2)")
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
    for _ in range(a.repeats):
        for name, env in VARIANTS.items():
            runs[name].append(measure(env, a.passes))
            print(name, runs[name][-1], flush=True)
    summary = {
        name: {
            f"{what} {field}": statistics.median(r[what][field] for r in rs)
            for what in ("forward", "forward+backward")
            for field in ("seconds", "minor_faults")
        }
        for name, rs in runs.items()
    }
    write(a.out, {"environment": environment("cpu"), "model": "resnet50", "batch": 16, "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
