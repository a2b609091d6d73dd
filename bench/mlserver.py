"""One bundle through two fronts: `fisherguard serve` against MLServer running FisherGuard's runtime
(docs/serving-platforms.md#seldon-core-2), on the same Open Inference Protocol request.

    python -m bench.mlserver                    # -> bench/results/mlserver-cpu.json (needs .venv-mlserver and wrk)

The shipped MNIST bundle; one JSON infer request (`pixels` FP32 [1, 1, 28, 28], a clean gallery digit)
POSTed to /v2/models/mnist/infer by wrk (closed loop, one thread, C connections, 10 s). The service:
max batch 32, two torch threads. MLServer 1.7.1: the folder `fisherguard bundle mlserver` writes
(adaptive batching 32 / 5 ms), the model in the server's process, two torch threads. The two take
turns, repeat by repeat; medians.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.common import environment, free_port, write
from bench.load import ROOT, run_wrk, start_server, stop
from service.core.bundle import load_bundle
from service.core.images import decode
from service.core.packaging import export_mlserver
from service.serve.gallery import GALLERY

MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"


def body() -> bytes:
    x = decode((GALLERY / "mnist" / "00-clean.png").read_bytes(), load_bundle("mnist").input, 10**7)
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, *x.shape], "data": x.flatten().tolist()}]}).encode()


@contextmanager
def running(root: Path, models: Sequence[str], executable: Path = MLSERVER, timeout_s: float = 180) -> Iterator[tuple[int, int]]:
    """`mlserver start root` (settings.json written there, the model folders below it; the model in the
    server's process, two torch threads) until every one of `models` is ready: its HTTP and gRPC ports.
    Stopped on exit. Its output goes to root/mlserver.log, quoted when it does not get ready."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    (root / "settings.json").write_text(
        json.dumps({"http_port": http, "grpc_port": grpc, "metrics_port": metrics, "parallel_workers": 0, "host": "127.0.0.1"})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FISHERGUARD_", "MLSERVER_"))} | {"OMP_NUM_THREADS": "2"}
    log = root / "mlserver.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(executable), "start", str(root)], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(http, models):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MLServer did not get ready:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.3)
        yield http, grpc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ready(port: int, models: Sequence[str]) -> bool:
    try:
        return all(httpx.get(f"http://127.0.0.1:{port}/v2/models/{m}/ready").status_code == 200 for m in models)
    except httpx.TransportError:
        return False


def wrk(port: int, request: Path, connections: int, seconds: int) -> dict[str, Any]:
    res = run_wrk(f"http://127.0.0.1:{port}/v2/models/mnist/infer", request, connections, seconds, "application/json")
    return {
        "concurrency": connections,
        "requests_per_s": (res["requests"] - res["non2xx"]) / res["duration_s"],
        "p50_ms": res["p50_ms"],
        "p99_ms": res["p99_ms"],
        "non2xx": res["non2xx"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/mlserver-cpu.json"))
    a = p.parse_args()
    if not MLSERVER.is_file():
        raise SystemExit(
            f"no {MLSERVER}: python3 -m venv .venv-mlserver && .venv-mlserver/bin/pip install torch==2.13.0 mlserver==1.7.1 -e ."
        )
    levels = [int(c) for c in a.concurrency.split(",")]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {"fisherguard serve": {c: [] for c in levels}, "mlserver": {c: [] for c in levels}}
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        request.write_bytes(body())
        export_mlserver("mnist", Path(tmp) / "models" / "mnist", None, 32, 5.0)
        for _ in range(a.repeats):
            port = free_port()
            proc = start_server("mnist", 32, port, 2, "cpu")
            try:
                for c in levels:
                    runs["fisherguard serve"][c].append(wrk(port, request, c, a.seconds))
            finally:
                stop(proc)
            with running(Path(tmp) / "models", ["mnist"]) as (port, _):
                for c in levels:
                    runs["mlserver"][c].append(wrk(port, request, c, a.seconds))
            print({k: {c: round(v[c][-1]["requests_per_s"]) for c in levels} for k, v in runs.items()}, flush=True)
    summary = {
        front: {
            str(c): {k: statistics.median(r[k] for r in rs) for k in ("requests_per_s", "p50_ms", "p99_ms", "non2xx")}
            for c, rs in by_c.items()
        }
        for front, by_c in runs.items()
    }
    write(a.out, {"environment": environment("cpu"), "seconds": a.seconds, "repeats": a.repeats, "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
