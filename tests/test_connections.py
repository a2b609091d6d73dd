"""The per-address cap on requests in flight (docs/security.md#connections): an address holding its
cap of slow requests is refused at once with 429 `too_many_connections`, while another address, the
probes and the freed address are served."""

import time

import httpx

from service.serve.app import create_app
from service.serve.connections import ClientConcurrency
from service.serve.settings import Settings
from tests.conftest import png, serving
from tests.test_batching import PNG
from tests.test_front_door import _head, _raw


def _from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_an_address_at_its_cap_is_refused_and_others_are_served(mnist, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    app = create_app(Settings(device="cpu", per_address_concurrency=2), bundle=mnist)
    with serving(app) as base:
        host, port = base.removeprefix("http://").split(":")
        held = [_raw(host, int(port), _head(1000)) for _ in range(2)]  # bodies announced, never sent: two slots held
        cap = next(m for m in _middlewares(app) if isinstance(m, ClientConcurrency))
        end = time.monotonic() + 5
        while cap.inflight["127.0.0.1"] < 2 and time.monotonic() < end:
            time.sleep(0.01)
        with _from("127.0.0.1") as c:
            r = c.post(base + "/v1/detect", content=png(x[0]), headers=PNG)
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_connections" and r.headers["retry-after"] == "1"
            assert "2" in r.json()["error"]["message"]  # quotes the count and the cap
            assert c.get(base + "/healthz").status_code == 200  # probes are not counted
        with _from("127.0.0.2") as c:
            assert c.post(base + "/v1/detect", content=png(x[0]), headers=PNG).status_code == 200
        for s in held:
            s.close()
        end = time.monotonic() + 15
        with _from("127.0.0.1") as c:
            while (status := c.post(base + "/v1/detect", content=png(x[0]), headers=PNG).status_code) == 429 and time.monotonic() < end:
                time.sleep(0.05)  # the server notices the closed connections at its next read
            assert status == 200
        text = httpx.get(base + "/metrics").text
    assert 'fisherguard_errors_total{code="too_many_connections"} 1.0' in text


def _middlewares(app):  # type: ignore[no-untyped-def]
    """The built middleware instances, outermost first."""
    m = app.middleware_stack
    while m is not None:
        yield m
        m = getattr(m, "app", None)
