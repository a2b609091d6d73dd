"""The micro-batcher under load (docs/architecture.md#batching): real loopback servers, probe models."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from service.bundle import Bundle
from service.core.calibration import Calibration
from service.serve.app import create_app
from service.serve.detector import Detector
from service.serve.settings import Settings
from tests.conftest import free_port, png, serving, wait_ready

PNG = {"content-type": "image/png"}


class Probe(nn.Module):
    """Sleeps per forward; records the batch sizes it ran; raises on images whose pixel (0, 0) is 1
    (a model bug on one input) and returns NaN for images whose pixel (0, 1) is 1."""

    def __init__(self, delay_s: float = 0.0, oom_above: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        self.delay_s, self.oom_above = delay_s, oom_above
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.oom_above is not None and len(x) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.seen.append(len(x))
        time.sleep(self.delay_s)
        if bool((x[:, 0, 0, 0] == 1.0).any()):
            raise ValueError("poisoned input")
        z = self.net(x)
        return torch.where((x[:, 0, 0, 1] == 1.0)[:, None], torch.full_like(z, float("nan")), z)


def probe_bundle(model: Probe) -> Bundle:
    rng = np.random.default_rng(0)
    values = {k: np.sort(rng.standard_normal(200)) for k in ("confidence", "entropy", "margin")}
    cal = Calibration("probe", {"description": "synthetic"}, 0.05, "margin", values)
    card = {
        "name": "probe",
        "version": "0",
        "architecture": "-",
        "classes": [str(i) for i in range(10)],
        "input": {"channels": 1, "height": 28, "width": 28},
    }
    return Bundle(Path("."), card, model.eval(), "probe", cal)


def image(seed: int, poison: str | None = None) -> bytes:
    x = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(seed)) * 0.9
    if poison == "raise":
        x[0, 0, 0] = 1.0
    if poison == "nan":
        x[0, 0, 1] = 1.0
    return png(x)


@pytest.fixture
def probe_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Probe]]:
    opts = dict(request.param)
    model = Probe(opts.pop("delay_s", 0.0))
    with serving(create_app(Settings(device="cpu", **opts), bundle=probe_bundle(model))) as base:
        model.seen.clear()  # forget the warm-up
        yield base, model


async def _post_many(base: str, bodies: list[bytes], params: dict[str, str] | None = None) -> list[tuple[httpx.Response, float]]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:

        async def one(body: bytes) -> tuple[httpx.Response, float]:
            t0 = time.monotonic()
            r = await client.post(base + "/v1/detect", content=body, headers=PNG, params=params)
            return r, time.monotonic() - t0

        return await asyncio.gather(*(one(b) for b in bodies))


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


async def _queued(c: httpx.AsyncClient, base: str) -> bool:
    text = (await c.get(base + "/metrics")).text
    return any(line == 'fisherguard_queue_depth_images{model="mnist"} 40.0' for line in text.splitlines())


async def _until_async(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)


def metric(base: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("probe_server", [{"delay_s": 0.05, "max_batch_size": 16, "max_delay_ms": 20}], indirect=True)
def test_concurrent_requests_are_grouped_into_batches(probe_server) -> None:  # type: ignore[no-untyped-def]
    base, model = probe_server
    results = asyncio.run(_post_many(base, [image(i) for i in range(32)]))
    assert [r.status_code for r, _ in results] == [200] * 32
    batches, images = metric(base, "fisherguard_batch_size_images_count"), metric(base, "fisherguard_batch_size_images_sum")
    assert images == 32 and images / batches > 1
    assert max(model.seen) > 1 and sum(model.seen) == 32


@pytest.mark.parametrize("probe_server", [{"delay_s": 0.3, "max_batch_size": 1, "max_queue_images": 2}], indirect=True)
def test_overload_is_answered_at_once_with_503_and_retry_after(probe_server) -> None:  # type: ignore[no-untyped-def]
    base, _ = probe_server
    results = asyncio.run(_post_many(base, [image(i) for i in range(12)]))
    codes = [r.status_code for r, _ in results]
    assert codes.count(200) >= 2 and codes.count(503) >= 6 and set(codes) <= {200, 503}
    refused = [(r, t) for r, t in results if r.status_code == 503]
    for r, t in refused:
        assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "1"
        assert t < 0.3  # answered before even one image could have been computed
    assert metric(base, 'fisherguard_errors_total{code="overloaded"}') == len(refused)


@pytest.mark.parametrize("probe_server", [{"delay_s": 0.3, "max_batch_size": 1}], indirect=True)
def test_a_request_past_its_deadline_is_answered_503_and_its_work_dropped(probe_server) -> None:  # type: ignore[no-untyped-def]
    base, model = probe_server

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            first = asyncio.create_task(c.post(base + "/v1/detect", content=image(0), headers=PNG))
            await _until(lambda: len(model.seen) == 1)  # the first image occupies the worker
            late = asyncio.gather(
                *(c.post(base + "/v1/detect", content=image(i), headers=PNG, params={"timeout_ms": "100"}) for i in range(1, 4))
            )
            return [await first, *await late]

    first, *late = asyncio.run(scenario())
    assert first.status_code == 200
    for r in late:
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout" and "retry-after" in r.headers
    deadline = time.monotonic() + 5
    while metric(base, "fisherguard_images_dropped_total") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(base, "fisherguard_images_dropped_total") == 3
    assert sum(model.seen) == 1  # the three late images never reached the model


@pytest.mark.parametrize("probe_server", [{"delay_s": 0.4, "max_batch_size": 1}], indirect=True)
def test_a_client_that_disconnects_has_its_work_dropped(probe_server) -> None:  # type: ignore[no-untyped-def]
    base, model = probe_server
    host, port = base.removeprefix("http://").split(":")

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as c:
            busy = asyncio.create_task(c.post(base + "/v1/detect", content=image(0), headers=PNG))
            await _until(lambda: len(model.seen) == 1)
            body = image(1)
            with socket.create_connection((host, int(port))) as s:
                s.sendall(
                    b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await asyncio.sleep(0.1)  # queued behind the busy request; now the client goes away
            return await busy

    assert asyncio.run(scenario()).status_code == 200
    deadline = time.monotonic() + 5
    while metric(base, 'fisherguard_images_dropped_total{model="probe",reason="cancelled"}') < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(base, 'fisherguard_images_dropped_total{model="probe",reason="cancelled"}') == 1
    assert sum(model.seen) == 1


@pytest.mark.parametrize("probe_server", [{"max_batch_size": 8, "max_delay_ms": 50}], indirect=True)
def test_a_poisoned_image_fails_alone(probe_server) -> None:  # type: ignore[no-untyped-def]
    base, _ = probe_server
    files = [("file", (f"{i}.png", image(i, p), "image/png")) for i, p in enumerate([None, "raise", None, "nan", None])]
    r = httpx.post(base + "/v1/detect", files=files, timeout=30)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [s["status"] for s in res] == ["ok", "error", "ok", "error", "ok"]
    assert res[1]["error"]["code"] == "model_error" and "poisoned input" not in res[1]["error"]["message"]  # logged, not echoed
    assert res[3]["error"]["code"] == "non_finite"
    # alone in its request, and batched with other clients' images: only its own request fails
    results = asyncio.run(_post_many(base, [image(10), image(11, "raise"), image(12)]))
    assert [r.status_code for r, _ in results] == [200, 422, 200]
    assert results[1][0].json()["error"]["code"] == "model_error"


def test_cuda_out_of_memory_splits_the_batch_and_lowers_the_ceiling() -> None:
    model = Probe(oom_above=4)
    det = Detector(probe_bundle(model))
    x = torch.rand(16, 1, 28, 28) * 0.9
    out = det.run(x, ["margin"], [])
    assert len(out) == 16 and all(not isinstance(o, Exception) for o in out)
    assert det.batch_ceiling is not None and det.batch_ceiling <= 4
    model.seen.clear()
    det.run(x, ["margin"], [])
    assert max(model.seen) <= 4  # the next batches start at the lowered ceiling


@pytest.mark.parametrize("probe_server", [{"max_batch_size": 4}], indirect=True)
def test_the_batching_loop_survives_errors_and_is_restarted(probe_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    base, _ = probe_server
    from service.serve import batcher as batcher_module

    real = batcher_module.Batcher._run

    async def broken(self, batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("bug in the batch loop")

    monkeypatch.setattr(batcher_module.Batcher, "_run", broken)
    r = httpx.post(base + "/v1/detect", content=image(0), headers=PNG, timeout=10)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    monkeypatch.setattr(batcher_module.Batcher, "_run", real)
    assert httpx.post(base + "/v1/detect", content=image(1), headers=PNG, timeout=10).status_code == 200
    assert httpx.get(base + "/readyz").status_code == 200


def test_a_dead_batching_loop_is_restarted(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    x, _ = digits
    with TestClient(create_app(Settings(device="cpu"), bundle=mnist)) as client:
        batcher = client.app.state.fg.batcher  # type: ignore[attr-defined]
        dead = batcher.task
        client.portal.call(lambda: dead.cancel())  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        while (batcher.task is dead or not batcher.running) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dead.cancelled() and batcher.task is not dead and batcher.running
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/detect", content=png(x[0]), headers=PNG).status_code == 200


@pytest.mark.slow
def test_sigterm_under_load_loses_no_accepted_request(digits) -> None:  # type: ignore[no-untyped-def]
    """A real `fisherguard serve` process: requests accepted before SIGTERM all get 200; requests
    after it get 503 shutting_down (or find the port closed); the process exits 0."""
    port = free_port()
    env = {**os.environ, "FISHERGUARD_MAX_DELAY_MS": "1000", "FISHERGUARD_MAX_BATCH_SIZE": "64"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    x, _ = digits
    try:
        wait_ready(base, 120)

        async def scenario() -> tuple[list[httpx.Response], list[httpx.Response | BaseException]]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
                before = [asyncio.create_task(c.post(base + "/v1/detect", content=png(x[i % 16]), headers=PNG)) for i in range(40)]
                await _until_async(lambda: _queued(c, base), 30)  # all 40 accepted and queued (the batch waits 1 s)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
                after = await asyncio.gather(
                    *(c.post(base + "/v1/detect", content=png(x[0]), headers=PNG) for _ in range(5)), return_exceptions=True
                )
                return list(await asyncio.gather(*before)), after

        before, after = asyncio.run(scenario())
        assert [r.status_code for r in before] == [200] * 40
        for r in after:
            assert isinstance(r, httpx.ConnectError) or (
                isinstance(r, httpx.Response) and r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            )
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
