"""Service throughput and latency under load, on the shipped decisions: what batching buys, how
overload is refused, what a co-batched heatmap request costs its neighbours, and what a request of
decompression bombs costs.

    python -m bench.load                                  # both bundles -> bench/results/load-cpu.json (needs Debian's wrk)
    python -m bench.load --device cuda --out bench/results/load-cuda.json

Per bundle, `fisherguard serve` as a real process on the same machine as the load:
- closed loop (wrk, one thread, C connections) at max_batch_size 1 and 32: images/s, p50/p90/p99,
  503 rate, mean batch size (from the service's own metrics);
- open loop (bench/openloop.py: Poisson arrivals on keep-alive connections) at 0.5×, 1× and 3× the
  sustainable rate: latency from each request's scheduled send time (queueing is not hidden) of the
  accepted requests and of the 503s, lost requests, and the server's resident memory before and after;
- the engine's offline rate for the same decision at batch 32 (`core.scoring.score`), in the same run;
- heatmaps: the compute time of default requests batched alone and batched beside `heatmaps=fis` ones;
- bombs: requests of 64 highly compressible 6000×6000 PNGs, to an overloaded and to an idle server.
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench import openloop
from bench.common import compressible_png, environment, free_port, write
from service.core.bundle import load_bundle
from service.core.scores import DEFAULT
from service.core.scoring import score
from service.serve.gallery import GALLERY

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 16, 32, 64)
LOAD_FACTORS = (0.5, 1.0, 3.0)


def start_server(model: str, batch: int, port: int, threads: int, device: str, **env: str) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "FISHERGUARD_MODEL": model,
        "FISHERGUARD_DEVICE": device,
        "FISHERGUARD_MAX_BATCH_SIZE": str(batch),
        "FISHERGUARD_TORCH_THREADS": str(threads),
        "FISHERGUARD_LOG_LEVEL": "warning",
        **env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=environ, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def scrape(base: str) -> dict[str, float]:
    """The engine's batch-size histogram sum and count, summed over the served models (their `model`
    label dropped: the series carry it since several bundles can share a process)."""
    out: dict[str, float] = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(("fisherguard_batch_size_images_sum", "fisherguard_batch_size_images_count")):
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def mean_batch(before: dict[str, float], after: dict[str, float]) -> float | None:
    n = after.get("fisherguard_batch_size_images_count", 0) - before.get("fisherguard_batch_size_images_count", 0)
    s = after.get("fisherguard_batch_size_images_sum", 0) - before.get("fisherguard_batch_size_images_sum", 0)
    return s / n if n else None


def run_wrk(url: str, body: Path, connections: int, seconds: int, content_type: str = "image/png") -> dict[str, Any]:
    """One closed-loop wrk run POSTing the file `body` to `url` (one thread, C connections): wrk's own
    numbers as bench/post.lua prints them (requests, duration_s, non2xx, timeouts, p50/p90/p99_ms)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(ROOT / "bench" / "post.lua"), url]
    env = {**os.environ, "FG_IMAGE": str(body), "FG_CONTENT_TYPE": content_type}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return dict(json.loads(out.split("WRK_JSON", 1)[1].strip().splitlines()[0]))


def wrk(base: str, image: Path, connections: int, seconds: int) -> dict[str, Any]:
    """One closed-loop run against /v1/detect, with the service's mean batch size from its metrics."""
    before = scrape(base)
    res = run_wrk(base + "/v1/detect", image, connections, seconds)
    return {
        "concurrency": connections,
        "images_per_s": (res["requests"] - res["non2xx"]) / res["duration_s"],
        "p50_ms": res["p50_ms"],
        "p90_ms": res["p90_ms"],
        "p99_ms": res["p99_ms"],
        "rate_503": res["non2xx"] / max(res["requests"], 1),
        "mean_batch_size": mean_batch(before, scrape(base)),
    }


async def _request(host: str, port: int, body: bytes, path: str = "/v1/detect", ctype: str = "image/png") -> tuple[int, bytes, float]:
    """One POST on a fresh keep-alive connection with a minimal HTTP/1.1 client (little CPU per request),
    the response read while the body is still being sent, as HTTP clients do: a server that refuses
    before reading the body answers at once and drains the rest (uvicorn closes a `Connection: close`
    request instead, and the refusal can be lost in the reset)."""
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"

    async def response() -> bytes:
        start = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in start.lower().split(b"\r\n") if line.startswith(b"content-length:"))
        return start + await reader.readexactly(length)

    answer = asyncio.create_task(response())
    writer.write(head.encode())
    for i in range(0, len(body), 1 << 16):
        if answer.done():
            break
        writer.write(body[i : i + (1 << 16)])
        await writer.drain()
    data = await answer
    writer.close()
    return int(data.split(b" ", 2)[1]), data, time.monotonic()


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1000) if values else None


def open_loop(base: str, body: bytes, rate: float, seconds: float) -> dict[str, Any]:
    """Poisson arrivals at `rate` on keep-alive connections (bench/openloop.py), latency from the scheduled time."""
    host, port = base.removeprefix("http://").split(":")
    results = openloop.loop_run(openloop.run(host, int(port), openloop.post(host, "/v1/detect", body), rate, seconds))
    return summarise(results, rate, seconds)


def summarise(results: list[openloop.Result], rate: float, seconds: float) -> dict[str, Any]:
    """An open loop's answers: accepted images/s, latencies of the accepted and of the 503s, losses."""
    ok = [r.latency_s for r in results if r.status == 200]
    refused = [r.latency_s for r in results if r.status == 503]
    return {
        "offered_per_s": rate,
        "sent": len(results),
        "ok": len(ok),
        "rate_503": len(refused) / max(len(results), 1),
        "lost_or_failed": sum(1 for r in results if r.status not in (200, 503)),
        "images_per_s": len(ok) / seconds,
        "p50_ms": pct(ok, 50),
        "p99_ms": pct(ok, 99),
        "max_ms": pct(ok, 100),
        "p50_503_ms": pct(refused, 50),
        "p99_503_ms": pct(refused, 99),
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def engine_offline(model: str, batch: int, device: str, seconds: float = 5.0) -> float:
    """Images/s of `core.scoring.score` on the decision a default request computes, at this batch size."""
    bundle = load_bundle(model, device)
    cal = bundle.calibration
    assert cal is not None
    names = list(dict.fromkeys((*DEFAULT, *cal.decision_scores)))
    x = torch.rand(batch, *bundle.input_shape)
    score(bundle, x, names)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        score(bundle, x, names)
        n += batch
    return n / (time.perf_counter() - t0)


async def heatmap_neighbours(base: str, body: bytes, rounds: int = 8, group: int = 16) -> dict[str, Any]:
    """Server compute time (timing_ms.compute) of `group` default requests sent together, alone and
    beside `group` requests asking for the fis heatmap (max_delay_ms large enough to batch them)."""
    host, port = base.removeprefix("http://").split(":")

    async def compute_ms(path: str) -> float:
        _, data, _ = await _request(host, int(port), body, path)
        return float(json.loads(data.split(b"\r\n\r\n", 1)[1])["timing_ms"]["compute"])

    alone, mixed = [], []
    for _ in range(rounds):
        alone += await asyncio.gather(*(compute_ms("/v1/detect") for _ in range(group)))
        both = await asyncio.gather(
            *(compute_ms("/v1/detect") for _ in range(group)), *(compute_ms("/v1/detect?heatmaps=fis") for _ in range(group))
        )
        mixed += both[:group]
    return {
        "alone_median_ms": statistics.median(alone),
        "beside_fis_median_ms": statistics.median(mixed),
        "ratio": statistics.median(mixed) / statistics.median(alone),
    }


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "fisherguardbench"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        + f
        + b"\r\n"
        for i, f in enumerate(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def bombs(base: str, proc: subprocess.Popen[bytes], body: bytes, overload_rate: float | None, seconds: float) -> dict[str, Any]:
    """Requests of 64 compressible 6000×6000 PNGs each: to an idle server (one request), or every 0.5 s
    while an open loop offers `overload_rate` (the queue full most of the time)."""
    host, port = base.removeprefix("http://").split(":")
    payload, ctype = multipart([compressible_png(6000)] * 64)
    load: threading.Thread | None = None
    if overload_rate is not None:
        load = threading.Thread(target=open_loop, args=(base, body, overload_rate, seconds), daemon=True)
        load.start()
        time.sleep(1.0)
    rss0, rows = rss_kb(proc.pid), []
    for _ in range(1 if overload_rate is None else int(2 * (seconds - 2))):
        t0 = time.monotonic()
        status, data, done = asyncio.run(_request(host, int(port), payload, ctype=ctype))
        code = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] if status != 200 else None
        rows.append({"status": status, "code": code, "ms": 1000 * (done - t0)})
        if overload_rate is not None:
            time.sleep(0.5)
    if load is not None:
        load.join()
    return {"requests": rows, "rss_growth_kb": rss_kb(proc.pid) - rss0, "bytes": len(payload)}


def bench_model(model: str, threads: int, device: str, seconds: int) -> dict[str, Any]:
    image = GALLERY / model / "00-clean.png"
    body = image.read_bytes()
    out: dict[str, Any] = {"engine_offline_images_per_s_b32": engine_offline(model, 32, device), "configs": {}}
    for batch in (1, 32):
        port = free_port()
        proc = start_server(model, batch, port, threads, device)
        base = f"http://127.0.0.1:{port}"
        cfg: dict[str, Any] = {}
        try:
            cfg["closed_loop"] = [wrk(base, image, c, seconds) for c in CONCURRENCY]
            for row in cfg["closed_loop"]:
                print(f"{model} b{batch} C={row['concurrency']}: {row['images_per_s']:.1f} img/s p99 {row['p99_ms']:.1f} ms", flush=True)
            sustainable = max(r["images_per_s"] for r in cfg["closed_loop"])
            cfg["sustainable_images_per_s"] = sustainable
            if batch == 32:
                rss0 = rss_kb(proc.pid)
                cfg["open_loop"] = [open_loop(base, body, f * sustainable, seconds) | {"load_factor": f} for f in LOAD_FACTORS]
                cfg["rss_kb"] = {"before": rss0, "after": rss_kb(proc.pid)}
                for row in cfg["open_loop"]:
                    print(
                        f"{model} open {row['load_factor']}x: p99 ok {row['p99_ms']} ms, 503 {row['rate_503']:.3f} p99 {row['p99_503_ms']} ms, lost {row['lost_or_failed']}",
                        flush=True,
                    )
                cfg["bombs_overloaded"] = bombs(base, proc, body, 3 * sustainable, seconds)
                cfg["bombs_idle"] = bombs(base, proc, body, None, seconds)
                print(f"{model} bombs: overloaded {cfg['bombs_overloaded']['requests']}, idle {cfg['bombs_idle']}", flush=True)
        finally:
            cfg["exit_status"] = stop(proc)
        out["configs"][str(batch)] = cfg
    port = free_port()  # the engine at the front's own CPU priority, for comparison
    proc = start_server(model, 32, port, threads, device, FISHERGUARD_ENGINE_NICE="0")
    try:
        sustainable = out["configs"]["32"]["sustainable_images_per_s"]
        out["open_loop_3x_engine_nice_0"] = open_loop(f"http://127.0.0.1:{port}", body, 3 * sustainable, seconds)
    finally:
        stop(proc)
    port = free_port()
    proc = start_server(model, 32, port, threads, device, FISHERGUARD_MAX_DELAY_MS="50")
    try:
        out["heatmap_neighbours"] = asyncio.run(heatmap_neighbours(f"http://127.0.0.1:{port}", body))
    finally:
        stop(proc)
    c1 = {r["concurrency"]: r for r in out["configs"]["1"]["closed_loop"]}
    c32 = {r["concurrency"]: r for r in out["configs"]["32"]["closed_loop"]}
    out["batched_over_unbatched_at_c32"] = c32[32]["images_per_s"] / c1[32]["images_per_s"]
    out["service_over_engine_b32"] = out["configs"]["32"]["sustainable_images_per_s"] / out["engine_offline_images_per_s_b32"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mnist,cifar10")
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server and the offline engine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load-cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    report: dict[str, Any] = {"environment": environment(a.device), "models": {}}
    for model in a.models.split(","):
        report["models"][model] = bench_model(model, a.threads, a.device, a.seconds)
        print(json.dumps({k: v for k, v in report["models"][model].items() if k != "configs"}, indent=1), flush=True)
    write(a.out, report)


if __name__ == "__main__":
    main()
