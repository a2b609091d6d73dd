"""The service's resident memory under a long run, per allocator (docs/deployment.md#memory).

    python -m bench.memory                      # -> bench/results/memory-cpu.json

`fisherguard serve` (MNIST, CPU) as a real process takes N requests (one PNG each, every fifth one
bad, on fresh connections, concurrency 64) after a 2,000-request warm-up; its resident set is read
after every chunk and the least-squares slope against the request count says how much it grows per
request. Variants, taking turns repeat by repeat: glibc's malloc (`--allocator system`), jemalloc
(`--allocator jemalloc`, pages kept: the service's MALLOC_CONF), jemalloc with its default decay, and
glibc's malloc with a fixed 1 MiB mmap threshold.
"""

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import environment, free_port, write
from bench.load import rss_kb, start_server, stop
from service.serve.allocator import find_jemalloc
from service.serve.gallery import GALLERY

VARIANTS: dict[str, dict[str, str]] = {
    "glibc": {"FISHERGUARD_ALLOCATOR": "system"},
    "jemalloc": {"FISHERGUARD_ALLOCATOR": "jemalloc"},  # with the service's MALLOC_CONF (allocator.CONF)
    "jemalloc, its default 10 s decay": {"FISHERGUARD_ALLOCATOR": "jemalloc", "MALLOC_CONF": ""},
    "glibc, mmap threshold 1 MiB": {"FISHERGUARD_ALLOCATOR": "system", "MALLOC_MMAP_THRESHOLD_": "1048576"},
}


async def one(port: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1])


async def load(port: int, bodies: list[bytes], n: int, concurrency: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int) -> int:
        async with sem:
            return await one(port, bodies[i % len(bodies)])

    return list(await asyncio.gather(*(run(i) for i in range(n))))


def measure(env: dict[str, str], bodies: list[bytes], n: int, chunk: int) -> dict[str, Any]:
    port = free_port()
    proc = start_server("mnist", 32, port, 1, "cpu", FISHERGUARD_MAX_QUEUE_IMAGES="4096", **env)
    try:
        asyncio.run(load(port, bodies, 2000, 64))
        rss0, rss, statuses = rss_kb(proc.pid), [], []
        t0 = time.monotonic()
        for _ in range(n // chunk):
            statuses += asyncio.run(load(port, bodies, chunk, 64))
            rss.append(rss_kb(proc.pid))
        seconds = time.monotonic() - t0
    finally:
        stop(proc)
    assert set(statuses) <= {200, 400}, sorted(set(statuses))
    requests = np.arange(1, len(rss) + 1) * chunk
    return {
        "slope_kb_per_request": float(np.polyfit(requests, np.asarray(rss, dtype=float), 1)[0]),
        "rss_after_warm_up_mb": rss0 / 1024,
        "rss_mb": [r / 1024 for r in rss],
        "seconds": seconds,
        "requests_per_s": n / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30_000)
    p.add_argument("--chunk", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/memory-cpu.json"))
    a = p.parse_args()
    if find_jemalloc() is None:
        raise SystemExit("no libjemalloc.so.2 on this machine (apt-get install libjemalloc2)")
    clean = [f.read_bytes() for f in sorted((GALLERY / "mnist").glob("*-clean.png"))]
    bodies = [*(clean * 8)[:8], b"not an image", clean[0][:50]]  # one in five is bad
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
    for _ in range(a.repeats):
        for name, env in VARIANTS.items():
            runs[name].append(measure(env, bodies, a.requests, a.chunk))
            print(name, round(runs[name][-1]["slope_kb_per_request"], 2), round(runs[name][-1]["seconds"]), flush=True)
    summary = {
        name: {
            "median_slope_kb_per_request": statistics.median(r["slope_kb_per_request"] for r in rs),
            "median_requests_per_s": statistics.median(r["requests_per_s"] for r in rs),
            "median_rss_after_warm_up_mb": statistics.median(r["rss_after_warm_up_mb"] for r in rs),
        }
        for name, rs in runs.items()
    }
    write(
        a.out,
        {"environment": environment("cpu"), "requests": a.requests, "chunk": a.chunk, "concurrency": 64, "summary": summary, "runs": runs},
    )


if __name__ == "__main__":
    main()
