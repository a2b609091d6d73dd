"""The front door under overload (docs/architecture.md#admission): refusals before the body is read,
room held for admitted requests, the per-request pixel budget, Pillow's bomb check, and each image
paying only for what its own request asked."""

import asyncio
import io
import json
import socket
import time
from collections.abc import Sequence

import httpx
import pytest
import torch
from PIL import Image

from bench.common import compressible_png
from service.core.bundle import Bundle
from service.serve import uploads
from service.serve.app import create_app
from service.serve.batcher import Batcher
from service.serve.metrics import Metrics, ModelMetrics
from service.serve.settings import Settings
from tests.conftest import png, serving
from tests.test_batching import PNG, Probe, image, probe_bundle


async def _busy(base: str, app, model: Probe, n: int) -> list[asyncio.Task[httpx.Response]]:  # type: ignore[no-untyped-def]
    """n requests: the first occupies the worker, the others then fill the queue."""
    client = httpx.AsyncClient(timeout=30)
    seen = len(model.seen)
    tasks = [asyncio.ensure_future(client.post(base + "/v1/detect", content=image(0), headers=PNG))]
    await _wait_for(lambda: len(model.seen) > seen)
    tasks += [asyncio.ensure_future(client.post(base + "/v1/detect", content=image(i), headers=PNG)) for i in range(1, n)]
    await _wait_for(lambda: len(app.state.fg.batcher.queue) == n - 1)  # decoded and queued
    return tasks


def _raw(host: str, port: int, head: bytes, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((host, port))
    s.settimeout(timeout)
    s.sendall(head)
    return s


def _read_status(s: socket.socket) -> tuple[int, bytes]:
    """The status and the whole response (head and JSON body, as far as its content-length)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length:")), 0)


def _head(length: int, ctype: str = "image/png", path: str = "/v1/detect") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n".encode()


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


def _queued(app) -> int:  # type: ignore[no-untyped-def]
    return int(app.state.fg.batcher.occupied)


@pytest.mark.parametrize(
    ("path", "ctype", "route"),
    [
        ("/v1/detect", "image/png", "/v1/detect"),
        ("/v2/models/probe/infer", "application/json", "/v2/models/{model_name}/infer"),  # the protocol's error shape
    ],
)
def test_a_full_queue_is_refused_before_the_body_is_read(path: str, ctype: str, route: str) -> None:
    """The request's headers announce 10 MB that never come: the answer is 503 at once, not a wait;
    its metrics label is the route template, never the model name the client sent."""
    model = Probe(delay_s=0.5)
    app = create_app(Settings(device="cpu", max_batch_size=1, max_queue_images=2), bundle=probe_bundle(model))
    with serving(app) as base:
        host, port = base.removeprefix("http://").split(":")

        async def scenario() -> tuple[int, bytes, float]:
            tasks = await _busy(base, app, model, 3)  # one runs, two fill the queue
            t0 = time.monotonic()
            s = _raw(host, int(port), _head(10_000_000, ctype, path))
            status, head = await asyncio.to_thread(_read_status, s)
            elapsed = time.monotonic() - t0
            s.close()
            await asyncio.gather(*tasks)
            return status, head, elapsed

        status, head, elapsed = asyncio.run(scenario())
        metrics = httpx.get(base + "/metrics").text
    body = json.loads(head.split(b"\r\n\r\n", 1)[1])
    code = body["code"] if path.startswith("/v2/") else body["error"]["code"]
    assert status == 503 and b"retry-after: 1" in head.lower() and code == "overloaded"
    assert elapsed < 0.5  # before the first queued image could even have finished
    assert f'route="{route}",status="503"' in metrics and (route == path or f'route="{path}"' not in metrics)


def test_an_admitted_request_keeps_its_room() -> None:
    """A is admitted while its body is still on the wire; B, sent complete afterwards, finds no room
    (503); A's image is then queued into the room it was admitted with and answered 200."""
    model = Probe(delay_s=0.3)
    app = create_app(Settings(device="cpu", max_batch_size=1, max_queue_images=1), bundle=probe_bundle(model))
    with serving(app) as base:
        host, port = base.removeprefix("http://").split(":")
        body = image(7)

        async def scenario() -> tuple[int, int]:
            s = _raw(host, int(port), _head(len(body)) + body[:10])  # A: admitted, body unfinished
            await _wait_for(lambda: _queued(app) == 1)
            async with httpx.AsyncClient(timeout=30) as c:
                b = await c.post(base + "/v1/detect", content=image(8), headers=PNG)
            s.sendall(body[10:])
            status, _ = await asyncio.to_thread(_read_status, s)
            s.close()
            return b.status_code, status

        b_status, a_status = asyncio.run(scenario())
    assert (b_status, a_status) == (503, 200)


@pytest.fixture(scope="module")
def bombs() -> list[tuple[str, tuple[str, bytes, str]]]:
    one = compressible_png(6000)  # 36 megapixels each, under the per-image limit of 40
    assert len(one) < 100_000 and Image.open(io.BytesIO(one)).size == (6000, 6000)
    return [("file", (f"{i}.png", one, "image/png")) for i in range(64)]


def test_64_compressible_pngs_to_a_full_queue_are_refused_without_decoding(bombs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    opened: list[int] = []

    def spy(*args: object) -> Image.Image:
        opened.append(1)
        return Image.new("L", (1, 1))

    monkeypatch.setattr(uploads, "open_image", spy)
    model = Probe(delay_s=0.5)
    app = create_app(Settings(device="cpu", max_batch_size=1, max_queue_images=2), bundle=probe_bundle(model))
    with serving(app) as base:

        async def scenario() -> tuple[httpx.Response, float]:
            tasks = await _busy(base, app, model, 3)
            opened.clear()  # the three that fill the queue were decoded
            async with httpx.AsyncClient(timeout=30) as c:
                t0 = time.monotonic()
                r = await c.post(base + "/v1/detect", files=bombs)
                elapsed = time.monotonic() - t0
            await asyncio.gather(*tasks)
            return r, elapsed

        r, elapsed = asyncio.run(scenario())
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "1"
    assert opened == [] and elapsed < 0.5


def test_64_compressible_pngs_to_an_idle_server_break_the_pixel_budget(bombs, monkeypatch, mnist: Bundle) -> None:  # type: ignore[no-untyped-def]
    decoded: list[int] = []
    real = uploads.to_tensor

    def spy(*args):  # type: ignore[no-untyped-def]
        decoded.append(1)
        return real(*args)

    monkeypatch.setattr(uploads, "to_tensor", spy)
    with serving(create_app(Settings(device="cpu"), bundle=mnist)) as base:
        t0 = time.monotonic()
        r = httpx.post(base + "/v1/detect", files=bombs, timeout=30)
        elapsed = time.monotonic() - t0
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert "2304000000 pixels together, the limit is 50000000" in r.json()["error"]["message"]
    assert decoded == [] and elapsed < 1.0


def test_pillows_own_bomb_check_stays_on() -> None:
    import service.serve.app  # noqa: F401 - everything the service imports

    assert Image.MAX_IMAGE_PIXELS is not None


def test_each_shape_of_request_is_its_own_predict_call() -> None:
    """Three jobs in one batch, one of which asked for `fis`: two predict calls, the heatmap computed
    only for the row that asked, and each outcome back to its own job."""
    calls: list[tuple[int, list[str], list[str]]] = []

    def predict(x: torch.Tensor, scores: Sequence[str], heatmaps: Sequence[str]) -> list:  # type: ignore[type-arg]
        calls.append((len(x), list(scores), list(heatmaps)))
        return [(float(v), tuple(heatmaps)) for v in x[:, 0, 0, 0]]

    async def scenario() -> list:  # type: ignore[type-arg]
        b = Batcher(predict, max_batch=8, max_delay_s=0.05, max_queue=8, metrics=ModelMetrics(Metrics(), "probe"))
        b.start()
        jobs = []
        for v, maps in ((1.0, frozenset()), (2.0, frozenset({"fis"})), (3.0, frozenset())):
            held = b.reserve(1)
            assert held is not None
            jobs += b.submit([torch.full((1, 2, 2), v)], frozenset({"margin"}), maps, time.monotonic() + 5, held)
        out = [await j.future for j in jobs]
        await b.stop(1)
        return out

    out = asyncio.run(scenario())
    assert sorted(calls) == [(1, ["margin"], ["fis"]), (2, ["margin"], [])]
    assert out == [(1.0, ()), (2.0, ("fis",)), (3.0, ())]


def test_a_request_without_heatmaps_gets_none_beside_one_with_fis(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    with serving(create_app(Settings(device="cpu", max_delay_ms=200), bundle=mnist)) as base:

        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as c:
                return list(
                    await asyncio.gather(
                        c.post(base + "/v1/detect?heatmaps=fis", content=png(x[0]), headers=PNG),
                        c.post(base + "/v1/detect", content=png(x[1]), headers=PNG),
                    )
                )

        with_fis, plain = asyncio.run(both())
        batches = httpx.get(base + "/metrics").text
    assert set(with_fis.json()["results"][0]["heatmaps"]) == {"fis"}
    assert plain.json()["results"][0]["heatmaps"] == {}
    assert 'fisherguard_batches_total{model="mnist"} 2.0' in batches  # one batch, two predict calls: the two shapes


def test_the_decision_takes_one_forward_pass(mnist: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    """mnist's decision (margin, feature squeezing, multi-layer Mahalanobis): the image and its two
    squeezed copies go through the network together, and Mahalanobis reads that same pass."""
    from service.core.scoring import score

    x, _ = digits
    calls: list[int] = []
    hook = mnist.model.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    try:
        r = score(mnist, x[:4], ["confidence", "entropy", "margin", "feature_squeezing", "mahalanobis_layers"])
    finally:
        hook.remove()
    assert calls == [12]
    assert mnist.mahalanobis is not None and mnist.calibration is not None
    fs = mnist.mahalanobis.scores(mnist.model, x[:4], ["mahalanobis_layers"])["mahalanobis_layers"]
    assert torch.allclose(r.raw["mahalanobis_layers"], fs.cpu(), rtol=1e-6)


def test_a_client_gone_mid_body_is_no_server_error(mnist: Bundle) -> None:
    from tests.test_batching import metric

    with serving(create_app(Settings(device="cpu"), bundle=mnist)) as base:
        host, port = base.removeprefix("http://").split(":")
        s = _raw(host, int(port), _head(5000) + b"\x89PNG")  # admitted, then the client goes away
        s.close()
        deadline = time.monotonic() + 5
        while metric(base, 'fisherguard_errors_total{code="client_closed_request"}') < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(base, 'fisherguard_errors_total{code="client_closed_request"}') == 1
        assert metric(base, 'fisherguard_errors_total{code="internal_error"}') == 0
        assert httpx.get(base + "/readyz").status_code == 200
