"""Service throughput and latency under load: what batching buys, and how overload is handled.

    python -m bench.load            # -> bench/results/load-cpu.json (needs Debian's wrk)

For max_batch_size 1 and 32 on the default model (`fisherguard serve`, a real process):
- closed loop (wrk, one thread, C connections, C in 1..64): images/s, p50/p90/p99, 503 rate,
  mean batch size (from the service's own metrics);
- open loop (a small asyncio client, Poisson arrivals): latency measured from each request's
  scheduled send time, so queueing is not hidden, at 0.5x, 1x and 3x the sustainable rate;
- the engine's offline throughput at the same batch size, in the same run;
- resident memory of the server before and after a 20,000-request soak at concurrency 64.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.common import environment, free_port, write
from service.core.bundle import load_bundle
from service.core.scores import DEFAULT
from service.core.scoring import score

ROOT = Path(__file__).resolve().parent.parent

IMAGE = ROOT / "tests" / "fixtures" / "digit.png"


def start_server(batch: int, port: int, threads: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FISHERGUARD_MAX_BATCH_SIZE": str(batch),
        "FISHERGUARD_TORCH_THREADS": str(threads),
        "FISHERGUARD_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def scrape(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(("fisherguard_batch_size_images_sum", "fisherguard_batch_size_images_count", "fisherguard_requests_total")):
            key, value = line.rsplit(" ", 1)
            out[key] = out.get(key, 0.0) + float(value)
    return out


def mean_batch(before: dict[str, float], after: dict[str, float]) -> float | None:
    n = after.get("fisherguard_batch_size_images_count", 0) - before.get("fisherguard_batch_size_images_count", 0)
    s = after.get("fisherguard_batch_size_images_sum", 0) - before.get("fisherguard_batch_size_images_sum", 0)
    return s / n if n else None


def run_wrk(base: str, connections: int, seconds: int) -> dict[str, Any]:
    """One closed-loop wrk run; wrk's own numbers, as printed by bench/post.lua."""
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(ROOT / "bench" / "post.lua"),
        base + "/v1/detect",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FG_IMAGE": str(IMAGE)}, check=True).stdout
    return dict(json.loads(out.split("WRK_JSON", 1)[1].strip().splitlines()[0]))


def wrk(base: str, connections: int, seconds: int) -> dict[str, Any]:
    before = scrape(base)
    res = run_wrk(base, connections, seconds)
    after = scrape(base)
    return {
        "concurrency": connections,
        "images_per_s": (res["requests"] - res["non2xx"]) / res["duration_s"],
        "p50_ms": res["p50_ms"],
        "p90_ms": res["p90_ms"],
        "p99_ms": res["p99_ms"],
        "rate_503": res["non2xx"] / max(res["requests"], 1),
        "mean_batch_size": mean_batch(before, after),
    }


async def _request(host: str, port: int, body: bytes) -> tuple[int, float]:
    """One POST on a fresh connection with a minimal HTTP/1.1 client (little CPU per request)."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/detect HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1]), time.monotonic()


async def open_loop(base: str, rate: float, seconds: float, seed: int = 0) -> dict[str, Any]:
    host, port = base.removeprefix("http://").split(":")
    body = IMAGE.read_bytes()
    rng = random.Random(seed)
    t, schedule = 0.0, []
    while t < seconds:
        t += rng.expovariate(rate)
        schedule.append(t)
    start = time.monotonic() + 0.1

    async def one(at: float) -> tuple[int, float]:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        try:
            status, done = await asyncio.wait_for(_request(host, int(port), body), 60)
        except (OSError, TimeoutError):
            return 0, float("nan")
        return status, done - (start + at)  # from the scheduled send time

    results = await asyncio.gather(*(one(a) for a in schedule))
    ok = sorted(lat for st, lat in results if st == 200)
    refused = sorted(lat for st, lat in results if st == 503)
    pct = lambda v, q: float(np.percentile(v, q) * 1000) if v else None  # noqa: E731
    return {
        "offered_per_s": rate,
        "sent": len(schedule),
        "ok": len(ok),
        "rate_503": len(refused) / len(schedule),
        "lost_or_failed": sum(1 for st, _ in results if st not in (200, 503)),
        "images_per_s": len(ok) / seconds,
        "p50_ms": pct(ok, 50),
        "p90_ms": pct(ok, 90),
        "p99_ms": pct(ok, 99),
        "p99_503_ms": pct(refused, 99),
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def engine_offline(batch: int, seconds: float = 5.0) -> float:
    bundle = load_bundle("mnist")
    cal = bundle.calibration
    assert cal is not None
    names = list(dict.fromkeys((*DEFAULT, *cal.decision_scores)))  # what a default request computes
    x = torch.rand(batch, 1, 28, 28)
    score(bundle, x, names)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        score(bundle, x, names)
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--soak", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load-cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not IMAGE.exists():
        raise SystemExit(f"{IMAGE} is missing")
    report: dict[str, Any] = {"environment": environment("cpu"), "configs": {}}
    for batch in (1, 32):
        port = free_port()
        proc = start_server(batch, port, a.threads)
        base = f"http://127.0.0.1:{port}"
        try:
            cfg: dict[str, Any] = {"engine_offline_images_per_s": engine_offline(batch)}
            cfg["closed_loop"] = [wrk(base, c, a.seconds) for c in (1, 2, 4, 8, 16, 32, 64)]
            for row in cfg["closed_loop"]:
                print(
                    f"batch {batch:>2} C={row['concurrency']:>2}: {row['images_per_s']:7.1f} img/s p50 {row['p50_ms']:7.1f} p99 {row['p99_ms']:7.1f} ms 503 {row['rate_503']:.3f} mean batch {row['mean_batch_size']}"
                )
            sustainable = max(r["images_per_s"] for r in cfg["closed_loop"])
            cfg["sustainable_images_per_s"] = sustainable
            cfg["open_loop"] = [asyncio.run(open_loop(base, f * sustainable, a.seconds)) | {"load_factor": f} for f in (0.5, 1.0, 3.0)]
            for row in cfg["open_loop"]:
                print(
                    f"batch {batch:>2} open {row['load_factor']}x ({row['offered_per_s']:.0f}/s): ok {row['images_per_s']:.1f}/s p50 {row['p50_ms']} p99 {row['p99_ms']} ms, 503 {row['rate_503']:.3f} (p99 {row['p99_503_ms']} ms), lost {row['lost_or_failed']}"
                )
            if batch == 32 and a.soak:
                rss0 = rss_kb(proc.pid)
                before = scrape(base)
                res = run_wrk(base, 64, max(10, int(a.soak / max(sustainable, 1)) + 5))  # long enough for a.soak requests
                after = scrape(base)
                cfg["soak"] = {
                    "requests": res["requests"],
                    "rss_kb_before": rss0,
                    "rss_kb_after": rss_kb(proc.pid),
                    "served_by_metrics": after.get('fisherguard_requests_total{route="/v1/detect",status="200"}', 0)
                    - before.get('fisherguard_requests_total{route="/v1/detect",status="200"}', 0),
                    "non2xx": res["non2xx"],
                    "timeouts": res["timeouts"],
                }
                print("soak", cfg["soak"])
        finally:
            proc.send_signal(signal.SIGTERM)
            cfg["exit_status"] = proc.wait(timeout=60)
        report["configs"][str(batch)] = cfg
    c1 = {r["concurrency"]: r for r in report["configs"]["1"]["closed_loop"]}
    c32 = {r["concurrency"]: r for r in report["configs"]["32"]["closed_loop"]}
    report["batched_over_unbatched_at_c32"] = c32[32]["images_per_s"] / c1[32]["images_per_s"]
    report["service_over_engine_at_saturation_b32"] = (
        report["configs"]["32"]["sustainable_images_per_s"] / report["configs"]["32"]["engine_offline_images_per_s"]
    )
    print(json.dumps({k: v for k, v in report.items() if k not in ("configs",)}, indent=1))
    write(a.out, report)


if __name__ == "__main__":
    main()
