"""Reload without a gap (docs/api.md#reload): the admin call and SIGHUP read the bundle directory
again, swap the new version in while requests keep coming, never lose or fail one, and leave the
old version serving when the new one cannot be loaded."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.core.bundle import resolve
from service.serve.app import create_app
from service.serve.settings import Settings
from tests.conftest import free_port, png, serving, wait_ready
from tests.test_batching import PNG

KEY = {"authorization": "Bearer k1"}


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    """A copy of the shipped MNIST bundle that the test may change on disk."""
    return Path(shutil.copytree(resolve("mnist"), tmp_path / "mnist"))


def _bump(root: Path, version: str, **changes: object) -> None:
    card = json.loads((root / "card.json").read_text())
    (root / "card.json").write_text(json.dumps(card | {"version": version} | changes))


async def _traffic(base: str, body: bytes, stop: asyncio.Event, concurrency: int = 8) -> list[tuple[int, int, str]]:
    """Requests back to back from `concurrency` workers until `stop`: (worker, status, version served)."""
    out: list[tuple[int, int, str]] = []

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(base + "/v1/detect", content=body, headers=PNG | KEY)
            out.append((i, r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text))

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
    return out


def test_reload_under_traffic_loses_nothing_and_switches_once(bundle_dir: Path, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    app = create_app(Settings(device="cpu", model=str(bundle_dir), api_keys="k1"))
    with serving(app) as base:

        async def scenario() -> tuple[list[tuple[int, int, str]], httpx.Response]:
            stop = asyncio.Event()
            traffic = asyncio.ensure_future(_traffic(base, png(x[0]), stop))
            await asyncio.sleep(1.0)
            _bump(bundle_dir, "1.0.1")
            async with httpx.AsyncClient(timeout=60) as c:
                answer = await c.post(base + "/v1/models/mnist/reload", headers=KEY)
            await asyncio.sleep(1.0)
            stop.set()
            return await traffic, answer

        seen, answer = asyncio.run(scenario())
        info = httpx.get(base + "/v1/model", headers=KEY).json()
        metrics = httpx.get(base + "/metrics").text
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"] == "1.0.1" and answer.json()["previous"]["version"] == "1.0.0"
    assert [s for _, s, _ in seen if s != 200] == []  # not one error
    for worker in range(8):  # each worker's requests follow each other: old version, then new, never back
        versions = [v for i, _, v in seen if i == worker]
        switch = versions.index("1.0.1")
        assert switch > 0 and set(versions[:switch]) == {"1.0.0"} and set(versions[switch:]) == {"1.0.1"}
    assert len(seen) > 50
    assert info["card"]["version"] == "1.0.1"
    assert 'fisherguard_model_info{device="cpu",model="mnist",name="mnist",version="1.0.1"} 1.0' in metrics


def test_a_bundle_that_cannot_load_leaves_the_old_version_serving(bundle_dir: Path, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    app = create_app(Settings(device="cpu", model=str(bundle_dir), api_keys="k1"))
    with serving(app) as base:
        weights = (bundle_dir / "model.safetensors").read_bytes()
        (bundle_dir / "model.safetensors").write_bytes(weights[:-100])  # truncated
        r = httpx.post(base + "/v1/models/mnist/reload", headers=KEY, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "reload_failed"
        assert "keeps serving version 1.0.0" in r.json()["error"]["message"]

        (bundle_dir / "model.safetensors").write_bytes(weights)
        _bump(bundle_dir, "2.0.0", architecture="models.cifar10.model:build")
        r = httpx.post(base + "/v1/models/mnist/reload", headers=KEY, timeout=60)
        assert r.status_code == 422 and "changes ['architecture']" in r.json()["error"]["message"]

        _bump(bundle_dir, "2.0.0", architecture="models.mnist.model:build")
        cal = json.loads((bundle_dir / "calibration.json").read_text())
        (bundle_dir / "calibration.json").write_text(json.dumps(cal | {"weights_sha256": "0" * 64}))
        r = httpx.post(base + "/v1/models/mnist/reload", headers=KEY, timeout=60)
        assert r.status_code == 422 and "recalibrate" in r.json()["error"]["message"]

        d = httpx.post(base + "/v1/detect", content=png(x[1]), headers=PNG | KEY, timeout=30).json()
        assert d["model"]["version"] == "1.0.0" and d["results"][0]["predicted_class"] == int(y[1])
        assert httpx.post(base + "/v1/models/nope/reload", headers=KEY).status_code == 404
        assert httpx.post(base + "/v1/models/mnist/reload").status_code == 401


def test_reload_is_an_admin_call(mnist) -> None:  # type: ignore[no-untyped-def]
    with serving(create_app(Settings(device="cpu"), bundle=mnist)) as base:
        r = httpx.post(base + "/v1/models/mnist/reload")
        assert r.status_code == 403 and "API keys" in r.json()["error"]["message"]


@pytest.mark.slow
def test_sighup_reloads_a_running_server(bundle_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "FISHERGUARD_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(bundle_dir), "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 120)
        _bump(bundle_dir, "1.0.7")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(base + "/v1/model").json()["card"]["version"] != "1.0.7":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert httpx.get(base + "/readyz").status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
