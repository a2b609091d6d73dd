"""Quotas under a flood (docs/performance.md#quotas): how fast a key over its quota is refused, and
whether another key's latency moves while it floods.

    python -m bench.quotas                      # -> bench/results/quotas-cpu.json

`fisherguard serve` of the MNIST bundle (one torch thread, keys `victim` and `flooder`) takes a
victim's Poisson arrivals at --victim requests/s on keep-alive connections (bench/openloop.py;
latency from each request's scheduled send time) in four arms, each --seconds long, repeated:
`alone` (the victim only, quota set), `flooder within quota` (a second key at --within requests/s,
under the quota: the load the quota lets through), `flood` (that key at --flood requests/s, the same
quota, which it exceeds many times over: the load let through plus the refusals) and `flood, no
quota` (the same flood with no quota set: what the quota prevents). `flood` against `flooder within
quota` is what refusing costs the other keys; against `alone`, what a quota-abiding neighbour costs
them too. The load generator runs on the same machine. Medians over repeats of each arm's p50/p99.
"""

import argparse
import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

from bench import openloop
from bench.common import environment, free_port, write
from bench.load import pct, start_server, stop
from service.serve.gallery import GALLERY


def request(host: str, key: str, body: bytes) -> bytes:
    return openloop.post(host, "/v1/detect", body).replace(b"Content-Type:", f"Authorization: Bearer {key}\r\nContent-Type:".encode(), 1)


def once(quota: str | None, victim: float, flood: float, seconds: float, seed: int) -> dict[str, Any]:
    port, host = free_port(), "127.0.0.1"
    env = {"FISHERGUARD_API_KEYS": "victim,flooder"} | ({"FISHERGUARD_REQUEST_QUOTA": quota} if quota else {})
    proc = start_server("mnist", 32, port, 1, "cpu", **env)
    body = (GALLERY / "mnist" / "00-clean.png").read_bytes()
    try:

        async def both() -> tuple[list[openloop.Result], list[openloop.Result]]:
            runs = [openloop.run(host, port, request(host, "victim", body), victim, seconds, seed=seed, connections=64)]
            if flood:
                runs.append(openloop.run(host, port, request(host, "flooder", body), flood, seconds, seed=seed + 1000, connections=256))
            out = await asyncio.gather(*runs)
            return out[0], (out[1] if flood else [])

        v, f = openloop.loop_run(both())
    finally:
        stop(proc)
    ok = [r.latency_s for r in v if r.status == 200]
    refused = [r.latency_s for r in f if r.status == 429]
    return {
        "victim_sent": len(v),
        "victim_not_200": sum(1 for r in v if r.status != 200),
        "victim_p50_ms": pct(ok, 50),
        "victim_p99_ms": pct(ok, 99),
        "flood_sent": len(f),
        "flood_200": sum(1 for r in f if r.status == 200),
        "flood_429": len(refused),
        "flood_other": sum(1 for r in f if r.status not in (200, 429)),
        "flood_429_p50_ms": pct(refused, 50),
        "flood_429_p99_ms": pct(refused, 99),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quota", default="50/second")
    p.add_argument("--victim", type=float, default=25.0, help="the victim's requests per second (under the quota)")
    p.add_argument("--flood", type=float, default=1000.0, help="the flooder's requests per second")
    p.add_argument("--within", type=float, default=45.0, help="the flooder's requests per second in the within-quota arm")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/quotas-cpu.json"))
    a = p.parse_args()
    arms = {
        "alone": (a.quota, 0.0),
        "flooder within quota": (a.quota, a.within),
        "flood": (a.quota, a.flood),
        "flood, no quota": (None, a.flood),
    }
    out: dict[str, Any] = {
        "environment": environment("cpu"),
        "quota": a.quota,
        "victim_per_s": a.victim,
        "flood_per_s": a.flood,
        "arms": {},
    }
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in arms}
    for r in range(a.repeats):  # arms take turns, so machine noise hits them alike
        for name, (quota, flood) in arms.items():
            runs[name].append(once(quota, a.victim, flood, a.seconds, seed=r))
            print(name, json.dumps(runs[name][-1]), flush=True)
    for name, rs in runs.items():
        med = lambda k: statistics.median(x[k] for x in rs) if all(x[k] is not None for x in rs) else None  # noqa: B023, E731
        out["arms"][name] = {k: med(k) for k in rs[0]} | {"runs": rs}
    alone, within, flood = out["arms"]["alone"], out["arms"]["flooder within quota"], out["arms"]["flood"]
    for q in ("p50", "p99"):
        out[f"victim_{q}_flood_over_within"] = flood[f"victim_{q}_ms"] / within[f"victim_{q}_ms"]
        out[f"victim_{q}_flood_over_alone"] = flood[f"victim_{q}_ms"] / alone[f"victim_{q}_ms"]
    write(a.out, out)
    print(
        json.dumps(
            {k: v for k, v in out.items() if k != "arms"}
            | {n: {k: v for k, v in s.items() if k != "runs"} for n, s in out["arms"].items()},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
