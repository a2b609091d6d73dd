"""Shared benchmark helpers: environment capture and interleaved, repeated timing with medians."""

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from service.serve import allocator


def environment(device: str) -> dict[str, Any]:
    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator.in_use(),
        "malloc_conf": os.environ.get("MALLOC_CONF"),
    }


def allocator_argument(ap: argparse.ArgumentParser) -> None:
    """`--allocator`, as `fisherguard serve` takes it: the memory allocator shapes CPU timings of large
    tensors (docs/deployment.md#memory), so engine benchmarks run on the one the service runs on."""
    ap.add_argument("--allocator", choices=["auto", "jemalloc", "system"], default="auto", help="as `fisherguard serve --allocator`")


def use_allocator(choice: allocator.Allocator) -> None:
    """Re-executes this benchmark under the chosen allocator, with the service's configuration of it."""
    allocator.ensure(choice)


def timed(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(methods: dict[str, Callable[[], Any]], reps: int, device: str) -> dict[str, float]:
    """Median seconds per method; one warm-up each, then the methods take turns rep by rep so that
    machine noise hits them alike."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(reps):
        for k, fn in methods.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compressible_png(side: int) -> bytes:
    """A real side×side 8-bit grey PNG of zeros: tens of kB that decode to side² bytes (a decompression bomb)."""
    raw = zlib.compress((b"\0" * (side + 1)) * side, 9)  # each row: filter byte 0, then side zero pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )
