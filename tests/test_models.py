"""Several bundles in one process (docs/api.md#models): routes per model, the default, per-model
queues and admission, per-model metric series, and the settings that name them."""

import asyncio
import dataclasses
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.core.bundle import Bundle
from service.serve.app import create_app
from service.serve.lifespan import bundles
from service.serve.settings import Settings
from tests.conftest import FIXTURES, png, serving
from tests.test_batching import PNG, Probe, image, probe_bundle
from tests.test_front_door import _busy


def _cifar_png() -> tuple[bytes, int]:
    with np.load(FIXTURES / "cifar10_eval256.npz") as d:
        jpeg, at, y = d["test_jpeg"], d["test_offsets"], d["test_labels"]
        rgb = np.asarray(Image.open(io.BytesIO(jpeg[at[0] : at[1]].tobytes())).convert("RGB"))
    return png(torch.from_numpy(rgb).permute(2, 0, 1).float().div(255), "RGB"), int(y[0])


def test_two_bundles_behind_one_address(mnist: Bundle, cifar10: Bundle, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    with serving(create_app(Settings(device="cpu"), bundle=[mnist, cifar10])) as base:
        listed = httpx.get(base + "/v1/models").json()
        assert listed["default"] == "mnist" and [m["name"] for m in listed["models"]] == ["mnist", "cifar10"]
        assert all(m["ready"] for m in listed["models"])
        assert httpx.get(base + "/v1/models/cifar10").json()["card"]["name"] == "cifar10"
        assert httpx.get(base + "/v1/model").json()["card"]["name"] == "mnist"  # the default
        values = httpx.get(base + "/v1/models/cifar10/calibration/learned").json()["values"]
        assert len(values) == len(cifar10.calibration.values["learned"])  # type: ignore[union-attr]

        body, _ = _cifar_png()
        r = httpx.post(base + "/v1/models/cifar10/detect", content=body, headers=PNG, timeout=30).json()
        assert r["model"]["name"] == "cifar10" and r["results"][0]["status"] == "ok"
        d = httpx.post(base + "/v1/detect", content=png(x[3]), headers=PNG, timeout=30).json()
        assert d["model"]["name"] == "mnist" and d["results"][0]["predicted_class"] == int(y[3])
        m = httpx.post(base + "/v1/models/mnist/detect", content=png(x[3]), headers=PNG, timeout=30).json()
        assert m["results"][0]["decision"] == d["results"][0]["decision"]

        for path in ("/v1/models/nope", "/v1/models/nope/calibration/learned"):
            r404 = httpx.get(base + path)
            assert r404.status_code == 404 and "['mnist', 'cifar10']" in r404.json()["error"]["message"]
        r404 = httpx.post(base + "/v1/models/nope/detect", content=png(x[3]), headers=PNG)
        assert r404.status_code == 404 and r404.json()["error"]["code"] == "not_found"
        assert httpx.post(base + "/v1/detect?model_name=cifar10", content=png(x[3]), headers=PNG).json()["model"]["name"] == "mnist"

        text = httpx.get(base + "/metrics").text
        for model in ("mnist", "cifar10"):
            assert f'fisherguard_images_scored_total{{model="{model}",outcome="ok"}}' in text
            assert f'fisherguard_model_ready{{model="{model}"}} 1.0' in text
            assert f'fisherguard_model_info{{device="cpu",model="{model}",name="{model}"' in text
        assert 'route="/v1/models/{model_name}/detect"' in text and "nope" not in text


def test_a_full_queue_of_one_model_does_not_refuse_the_other() -> None:
    busy = Probe(delay_s=0.5)
    first = probe_bundle(Probe())
    other = dataclasses.replace(first, card={**first.card, "name": "other"})
    app = create_app(Settings(device="cpu", max_batch_size=1, max_queue_images=2), bundle=[probe_bundle(busy), other])
    with serving(app) as base:

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            tasks = await _busy(base, app, busy, 3)  # the default model: one runs, two fill its queue
            async with httpx.AsyncClient(timeout=30) as c:
                refused = await c.post(base + "/v1/detect", content=image(5), headers=PNG)
                served = await c.post(base + "/v1/models/other/detect", content=image(5), headers=PNG)
            await asyncio.gather(*tasks)
            return refused, served

        refused, served = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert served.status_code == 200 and served.json()["model"]["name"] == "other"


def test_bundles_must_have_different_names(mnist: Bundle) -> None:
    with pytest.raises(RuntimeError, match="share a name"):
        bundles(Settings(device="cpu"), "cpu", [mnist, mnist])


def test_the_model_setting_names_several_bundles(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(model="mnist, cifar10").models() == ["mnist", "cifar10"]
    monkeypatch.setenv("FISHERGUARD_MODEL", "cifar10,mnist")
    assert Settings().models() == ["cifar10", "mnist"]
    with pytest.raises(ValueError, match="names no bundle"):
        Settings(model=" , ").models()


def test_the_cli_repeats_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.cli import parser
    from service.serve import server

    seen: list[Settings] = []
    monkeypatch.setattr(server, "run", seen.append)
    a = parser().parse_args(["serve", "--model", "mnist", "--model", "cifar10", "--allocator", "system"])
    assert a.func(a) == 0 and seen[0].models() == ["mnist", "cifar10"]


def test_readiness_needs_every_model(mnist: Bundle, cifar10: Bundle) -> None:
    """/readyz answers 200 only when every model serves."""
    app = create_app(Settings(device="cpu"), bundle=[mnist, cifar10])
    with serving(app) as base:
        assert httpx.get(base + "/readyz").status_code == 200
        app.state.fg.models["cifar10"].warmed = False
        assert httpx.get(base + "/readyz").status_code == 503
        assert httpx.get(base + "/v2/health/ready").status_code == 400
        assert httpx.get(base + "/v2/models/mnist/ready").status_code == 200
        assert httpx.get(base + "/v2/models/cifar10/ready").status_code == 400
        app.state.fg.models["cifar10"].warmed = True
