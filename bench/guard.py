"""The guard-your-classifier sequence timed (docs/guard-your-classifier.md): a randomly initialised
torchvision ResNet-50 (1000 classes) and 64 generated clean images of six sizes, through the
commands the page shows, each in its own process.

    python -m bench.guard                       # -> bench/results/guard-cpu.json

Per step: wall seconds and the process's peak resident memory (`bundle create`, `calibrate` with
`--only fisher_input_trace --top-classes 10 --batch-size 16`); `serve`: seconds until /readyz
answers 200, then six JPEGs through /v1/detect one after another (seconds each). The commands run
through bench/vision.py's torchvision import (PyPI's CUDA-built torchvision beside the CPU torch).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from bench.common import environment, free_port, write
from bench.vision import import_torchvision

SIZES = [(320, 240), (240, 320), (256, 256), (500, 375), (300, 300), (640, 427)]  # (width, height)
SHIM = "import sys; from bench.vision import import_torchvision; import_torchvision(); from service.cli import main; sys.exit(main(sys.argv[1:]))"


def fisherguard(*args: str) -> list[str]:
    return [sys.executable, "-c", SHIM, *args]


def timed(cmd: list[str]) -> dict[str, float]:
    """Wall seconds and peak resident MB of one command (its own rusage, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd[3:]} exited with {proc.returncode}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


def prepare(root: Path, n: int) -> None:
    torch.manual_seed(0)
    torch.save(import_torchvision().models.resnet50(weights=None).state_dict(), root / "resnet50.pt")
    (root / "classes.txt").write_text("".join(f"class {k}\n" for k in range(1000)))
    (root / "clean").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC)
        img.save(root / "clean" / f"{i:03d}.jpg", quality=90)


def serve(bundle: Path, images: list[Path]) -> dict[str, Any]:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(fisherguard("serve", "--model", str(bundle), "--port", str(port)), stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.1)
        ready = time.perf_counter() - t0
        seconds = []
        for f in images:
            t = time.perf_counter()
            r = httpx.post(base + "/v1/detect", content=f.read_bytes(), headers={"content-type": "image/jpeg"}, timeout=120)
            r.raise_for_status()
            seconds.append(time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"ready_seconds": ready, "request_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/guard-cpu.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, a.images)
        bundle = root / "my-resnet50"
        create = ["bundle", "create", str(bundle), "--architecture", "torchvision.models:resnet50", "--weights", str(root / "resnet50.pt")]
        create += ["--classes", str(root / "classes.txt"), "--preset", "imagenet"]
        calibrate = ["calibrate", "--model", str(bundle), "--data", str(root / "clean"), "--split", "all", "--alpha", "0.05"]
        calibrate += ["--statistic", "fisher_input_trace", "--only", "fisher_input_trace", "--top-classes", "10"]
        calibrate += ["--batch-size", "16", "--device", "cpu", "--threads", "2"]
        steps: dict[str, Any] = {"bundle create": timed(fisherguard(*create)), "calibrate": timed(fisherguard(*calibrate))}
        steps["serve"] = serve(bundle, sorted((root / "clean").iterdir())[:6])
    out = {"environment": environment("cpu"), "images": a.images, "steps": steps}
    write(a.out, out)
    print(steps)


if __name__ == "__main__":
    main()
