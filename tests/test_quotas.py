"""Per-client quotas (docs/security.md#quotas): requests and images per API key (or per address),
429 `rate_limited` with Retry-After before the body or any image is read, other clients untouched."""

import asyncio

import httpx
import pytest

from service.serve.app import create_app
from service.serve.quotas import client_id
from service.serve.settings import Settings
from tests.conftest import png, serving
from tests.test_batching import PNG
from tests.test_front_door import _head, _raw, _read_status


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_key_over_its_request_quota_gets_429_fast_and_the_other_key_does_not(mnist, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    app = create_app(Settings(device="cpu", api_keys="k1,k2", request_quota="5/minute"), bundle=mnist)
    with serving(app) as base:
        statuses = []
        for _ in range(8):
            r = httpx.post(base + "/v1/detect", content=png(x[0]), headers=PNG | _auth("k1"), timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        assert statuses == [200] * 5 + [429] * 3
        host, port = base.removeprefix("http://").split(":")  # refused before the body: 10 MB announced, none sent
        s = _raw(host, int(port), _head(10_000_000).replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer k1"))
        status, _ = _read_status(s)
        s.close()
        assert status == 429
        assert httpx.post(base + "/v1/detect", content=png(x[0]), headers=PNG | _auth("k2"), timeout=30).status_code == 200
        oip = httpx.post(base + "/v2/models/mnist/infer", json={"inputs": []}, headers=_auth("k1"))
        assert oip.status_code == 429 and oip.json()["code"] == "rate_limited"  # the protocol's error shape
        text = httpx.get(base + "/metrics").text
    digest = client_id("k1", "")
    assert f'fisherguard_rate_limited_total{{client="{digest}",quota="requests"}} 5.0' in text and "k1" not in text.replace(digest, "")


def test_64_concurrent_connections_of_one_key_get_exactly_its_quota(mnist, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    app = create_app(Settings(device="cpu", api_keys="k1", request_quota="20/minute", max_queue_images=128), bundle=mnist)
    with serving(app) as base:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
                rs = await asyncio.gather(
                    *(c.post(base + "/v1/detect", content=png(x[i % 16]), headers=PNG | _auth("k1")) for i in range(64))
                )
            return [r.status_code for r in rs]

        statuses = asyncio.run(burst())
    assert statuses.count(200) == 20 and statuses.count(429) == 44


def test_the_image_quota_counts_images_before_decoding(mnist, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    files = [("file", (f"{i}.png", png(x[i]), "image/png")) for i in range(3)]
    with serving(create_app(Settings(device="cpu", image_quota="4/minute"), bundle=mnist)) as base:  # no keys: per address
        assert httpx.post(base + "/v1/detect", files=files, timeout=30).status_code == 200
        r = httpx.post(base + "/v1/detect", files=files, timeout=30)
        assert r.status_code == 429 and "images quota" in r.json()["error"]["message"]
        assert httpx.post(base + "/v1/detect", content=png(x[0]), headers=PNG, timeout=30).status_code == 200  # 1 image still fits


def test_a_bad_quota_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="request_quota 'lots' is not a rate"):
        create_app(Settings(device="cpu", request_quota="lots"))
