"""Reloading a model under load (docs/performance.md#reload): errors and latency while the new version
is loaded, warmed up and swapped in.

    python -m bench.reload                      # -> bench/results/reload-cpu.json

`fisherguard serve` of a copy of a shipped bundle (one torch thread, API key set) takes Poisson
arrivals at the given rate on keep-alive connections (bench/openloop.py; latency from each request's
scheduled send time). After --before seconds the card's version is bumped on disk and
`POST /v1/models/{name}/reload` is sent; the load goes on for --after seconds. Per repeat: requests
that were not answered 200, the p99 latency of the requests scheduled before the reload (steady
state) and of those scheduled from the reload call until one second after its answer (the swap).
"""

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import openloop
from bench.common import environment, free_port, write
from bench.load import pct, start_server, stop
from service.core.bundle import resolve
from service.serve.gallery import GALLERY


def bump(root: Path, version: str) -> None:
    card = json.loads((root / "card.json").read_text())
    (root / "card.json").write_text(json.dumps(card | {"version": version}))


def once(model: str, rate: float, before: float, after: float, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(resolve(model), Path(tmp) / model))
        port = free_port()
        proc = start_server(str(root), 32, port, 1, "cpu", FISHERGUARD_API_KEYS="bench")
        try:
            host, key = "127.0.0.1", "Authorization: Bearer bench\r\n"
            body = (GALLERY / model / "00-clean.png").read_bytes()
            request = openloop.post(host, "/v1/detect", body).replace(b"Content-Type:", key.encode() + b"Content-Type:", 1)
            swap: dict[str, float] = {}

            def reload_later() -> None:
                time.sleep(before)
                bump(root, "reloaded")
                swap["start"] = time.monotonic()
                r = httpx.post(f"http://{host}:{port}/v1/models/{model}/reload", headers={"authorization": "Bearer bench"}, timeout=120)
                swap["end"] = time.monotonic()
                swap["status"] = r.status_code
                swap["server_seconds"] = float(r.json().get("seconds", -1))

            t = threading.Thread(target=reload_later)
            t.start()
            results = openloop.loop_run(openloop.run(host, port, request, rate, before + after, seed=seed, connections=128))
            t.join()
        finally:
            stop(proc)
    steady = [r.latency_s for r in results if r.scheduled < swap["start"] and r.status == 200]
    during = [r.latency_s for r in results if swap["start"] <= r.scheduled <= swap["end"] + 1.0 and r.status == 200]
    return {
        "reload_status": swap["status"],
        "reload_seconds": swap["end"] - swap["start"],
        "reload_server_seconds": swap["server_seconds"],
        "sent": len(results),
        "not_200": sum(1 for r in results if r.status != 200),
        "steady_p50_ms": pct(steady, 50),
        "steady_p99_ms": pct(steady, 99),
        "swap_requests": len(during),
        "swap_p50_ms": pct(during, 50),
        "swap_p99_ms": pct(during, 99),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", nargs="+", default=["mnist:100", "cifar10:40"], help="model:requests per second (under its capacity)")
    p.add_argument("--before", type=float, default=8.0)
    p.add_argument("--after", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/reload-cpu.json"))
    a = p.parse_args()
    out: dict[str, Any] = {"environment": environment("cpu"), "before_s": a.before, "after_s": a.after, "models": {}}
    for spec in a.loads:
        model, rate = spec.split(":")
        runs = [once(model, float(rate), a.before, a.after, seed=r) for r in range(a.repeats)]
        ratio = [r["swap_p99_ms"] / r["steady_p99_ms"] for r in runs]
        out["models"][model] = {
            "rate_per_s": float(rate),
            "not_200_total": sum(r["not_200"] for r in runs),
            "median_steady_p99_ms": statistics.median(r["steady_p99_ms"] for r in runs),
            "median_swap_p99_ms": statistics.median(r["swap_p99_ms"] for r in runs),
            "median_swap_over_steady_p99": statistics.median(ratio),
            "median_reload_seconds": statistics.median(r["reload_seconds"] for r in runs),
            "runs": runs,
        }
        print(model, json.dumps({k: v for k, v in out["models"][model].items() if k != "runs"}), flush=True)
    write(a.out, out)


if __name__ == "__main__":
    main()
