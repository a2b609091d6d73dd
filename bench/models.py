"""Two bundles in one process: what each model's throughput keeps when the other one is busy too
(docs/performance.md#several-models).

    python -m bench.models                      # -> bench/results/models-cpu.json

One `fisherguard serve --model mnist --model cifar10` (one torch thread per engine: each model has
its own engine thread). Each model's capacity alone is measured first (open loop far above it: the
images/s served). Then, at offered loads of a fraction f of each capacity, Poisson arrivals on
keep-alive connections (bench/openloop.py) go to one model alone, to the other alone, and to both at
once, taking turns repeat by repeat; a model's ratio is its images/s served under the mixed load over
the images/s it was served alone at the same offered load (medians of the repeats).
"""

import argparse
import asyncio
import statistics
from pathlib import Path
from typing import Any

from bench import openloop
from bench.common import environment, free_port, write
from bench.load import start_server, stop, summarise
from service.serve.gallery import GALLERY

MODELS = ("mnist", "cifar10")


def load(port: int, rates: dict[str, float], seconds: float, seed: int) -> dict[str, dict[str, Any]]:
    """Open loops to the models in `rates` at once, one per model."""
    host = "127.0.0.1"
    bodies = {m: (GALLERY / m / "00-clean.png").read_bytes() for m in rates}

    async def both() -> list[list[openloop.Result]]:
        runs = [
            openloop.run(
                host, port, openloop.post(host, f"/v1/models/{m}/detect", bodies[m]), rate, seconds, seed=seed + i, connections=256
            )
            for i, (m, rate) in enumerate(rates.items())
        ]
        return list(await asyncio.gather(*runs))

    results = openloop.loop_run(both())
    return {m: summarise(r, rates[m], seconds) for m, r in zip(rates, results, strict=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--out", type=Path, default=Path("bench/results/models-cpu.json"))
    a = p.parse_args()
    port = free_port()
    proc = start_server(",".join(MODELS), 32, port, 1, "cpu", FISHERGUARD_MAX_QUEUE_IMAGES="256")
    try:
        load(port, dict.fromkeys(MODELS, 50.0), 3, seed=99)  # warm-up of both
        capacity = {m: load(port, {m: 3000.0}, a.seconds, seed=1)[m]["images_per_s"] for m in MODELS}
        print("capacity", capacity, flush=True)
        rows = []
        for f in a.fractions:
            rates = {m: f * capacity[m] for m in MODELS}
            alone: dict[str, list[dict[str, Any]]] = {m: [] for m in MODELS}
            mixed: dict[str, list[dict[str, Any]]] = {m: [] for m in MODELS}
            for r in range(a.repeats):
                for m in MODELS:
                    alone[m].append(load(port, {m: rates[m]}, a.seconds, seed=10 * r)[m])
                for m, s in load(port, rates, a.seconds, seed=10 * r).items():
                    mixed[m].append(s)
            row: dict[str, Any] = {"fraction_of_capacity": f, "offered_per_s": rates, "models": {}}
            for m in MODELS:
                served_alone = statistics.median(s["images_per_s"] for s in alone[m])
                served_mixed = statistics.median(s["images_per_s"] for s in mixed[m])
                row["models"][m] = {
                    "alone_images_per_s": served_alone,
                    "mixed_images_per_s": served_mixed,
                    "mixed_over_alone": served_mixed / served_alone,
                    "alone_p99_ms": statistics.median(s["p99_ms"] or 0.0 for s in alone[m]),
                    "mixed_p99_ms": statistics.median(s["p99_ms"] or 0.0 for s in mixed[m]),
                    "runs": {"alone": alone[m], "mixed": mixed[m]},
                }
                print(f, m, round(served_alone, 1), round(served_mixed, 1), round(served_mixed / served_alone, 3), flush=True)
            rows.append(row)
    finally:
        stop(proc)
    write(
        a.out,
        {
            "environment": environment("cpu"),
            "server": "fisherguard serve --model mnist --model cifar10, torch threads 1, max batch 32, max queue 256",
            "seconds": a.seconds,
            "repeats": a.repeats,
            "capacity_images_per_s": capacity,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
