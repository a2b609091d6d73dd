"""The HTTP API on the shipped MNIST bundle: exact status codes and JSON (docs/api.md)."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.bundle import Bundle
from service.lab.attacks import pgd_linf, quantise
from tests.conftest import png

PNG = {"content-type": "image/png"}


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ready"})


COMPONENTS = [
    {"score": "squeeze_drop", "tail": "one-sided"},
    {"score": "learned", "tail": "one-sided"},
]


def test_detect_one_png(client: TestClient, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    r = client.post("/v1/detect", content=png(x[0]), headers=PNG)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"model", "results", "timing_ms"}
    assert body["model"] == {"name": "mnist", "version": "1.0.0", "device": "cpu"}
    assert set(body["timing_ms"]) == {"queue", "compute", "total"}
    (res,) = body["results"]
    assert res["index"] == 0 and res["filename"] is None and res["status"] == "ok"
    assert res["predicted_class"] == int(y[0]) and res["label"] == str(int(y[0]))
    assert set(res["scores"]) == {"confidence", "entropy", "margin", "squeeze_drop", "learned"}
    assert set(res["p_values"]) == set(res["scores"])
    assert res["decision"]["statistic"] == "combined"
    assert res["decision"]["components"] == COMPONENTS
    assert res["decision"]["alpha"] == 0.01
    assert res["decision"]["flagged"] is False
    assert 0 < res["decision"]["p_value"] <= 1
    assert res["heatmaps"] == {}


def test_all_scores_and_heatmaps(client: TestClient, digits, mnist: Bundle) -> None:  # type: ignore[no-untyped-def]
    from service.core.baselines import feature_squeezing, forward_scores
    from service.fisher import HEATMAPS, SCORES, compute

    x, _ = digits
    r = client.post("/v1/detect?scores=all&heatmaps=" + ",".join(HEATMAPS), content=png(x[1]), headers=PNG)
    res = r.json()["results"][0]
    detectors = {"feature_squeezing", "squeeze_drop", "mahalanobis", "mahalanobis_layers", "learned", "fisher_noise_shift"}
    assert set(res["scores"]) == set(SCORES) | detectors
    assert res["scores"]["feature_squeezing"] == pytest.approx(float(feature_squeezing(mnist.model, x[1:2])[0]), rel=1e-5, abs=1e-9)
    drop = forward_scores(mnist.model, x[1:2], ["squeeze_drop"], None)[1]["squeeze_drop"]
    assert res["scores"]["squeeze_drop"] == pytest.approx(float(drop[0]), rel=1e-4, abs=1e-7)
    assert mnist.mahalanobis is not None
    assert res["scores"]["mahalanobis"] == pytest.approx(float(mnist.mahalanobis.score(mnist.model, x[1:2])[0]), rel=1e-5)
    layers = float(mnist.mahalanobis.layers_score(mnist.model, x[1:2])[0])
    assert res["scores"]["mahalanobis_layers"] == pytest.approx(layers, rel=1e-5)
    direct = compute(mnist.model, x[1:2], list(SCORES), HEATMAPS, **mnist.calibration.score_options)  # type: ignore[union-attr]
    for k in SCORES:
        assert res["scores"][k] == pytest.approx(float(direct.scores[k][0]), rel=1e-4), k
    for k in HEATMAPS:
        h = res["heatmaps"][k]
        assert h["shape"] == [28, 28]
        ref = direct.heatmaps[k][0].numpy()
        assert h["min"] == pytest.approx(float(ref.min()), rel=1e-4, abs=1e-12)
        assert np.abs(decode_heatmap(h) - ref).max() <= (h["max"] - h["min"]) / 255 + 1e-9


def decode_heatmap(h: dict) -> np.ndarray:  # type: ignore[type-arg]
    """A response heatmap back to floats, to 1/255 of its range: min + (max − min) · pixel / 255."""
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(h["png_base64"]))), dtype=np.float64)
    return h["min"] + (h["max"] - h["min"]) * pixels / 255.0


def test_alpha_override_changes_only_the_threshold(client: TestClient, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    a = client.post("/v1/detect", content=png(x[13]), headers=PNG).json()["results"][0]["decision"]
    b = client.post("/v1/detect?alpha=0.5", content=png(x[13]), headers=PNG).json()["results"][0]["decision"]
    assert a["p_value"] == b["p_value"] and b["alpha"] == 0.5
    assert b["flagged"] == (b["p_value"] <= 0.5)


def test_multipart_many_files_one_bad(client: TestClient, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    files = [
        ("file", ("a.png", png(x[0]), "image/png")),
        ("file", ("bad.png", b"not an image", "image/png")),
        ("file", ("c.png", png(x[2], "RGB"), "image/png")),
    ]
    r = client.post("/v1/detect", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [s["status"] for s in res] == ["ok", "error", "ok"]
    assert [s["filename"] for s in res] == ["a.png", "bad.png", "c.png"]
    assert res[1]["error"]["code"] == "bad_image" and "cannot decode" in res[1]["error"]["message"]
    assert res[0]["predicted_class"] == int(y[0]) and res[2]["predicted_class"] == int(y[2])


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_image_modes_and_sizes(client: TestClient, digits, mode: str) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    big = torch.nn.functional.interpolate(x[3:4], size=(112, 112), mode="bilinear")[0]
    for data in (png(x[3], mode), png(big, mode)):
        r = client.post("/v1/detect", content=data, headers=PNG)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["predicted_class"] == int(y[3])


def test_jpeg(client: TestClient, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    buf = io.BytesIO()
    Image.fromarray((x[4, 0] * 255).byte().numpy()).save(buf, "JPEG", quality=95)
    r = client.post("/v1/detect", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.json()["results"][0]["predicted_class"] == int(y[4])


def _error(r, status: int, code: str) -> str:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    return str(body["error"]["message"])


def test_errors(client: TestClient, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    assert "cannot decode" in _error(client.post("/v1/detect", content=b"hello", headers=PNG), 400, "bad_image")
    assert "0 bytes" in _error(client.post("/v1/detect", content=b"", headers=PNG), 400, "bad_image")
    assert "text/plain" in _error(
        client.post("/v1/detect", content=b"hi", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"
    )
    assert "'nope'" in _error(client.post("/v1/detect?heatmaps=nope", content=png(x[0]), headers=PNG), 400, "bad_request")
    assert "'bogus'" in _error(client.post("/v1/detect?scores=bogus", content=png(x[0]), headers=PNG), 400, "bad_request")
    assert "0.9" in _error(client.post("/v1/detect?alpha=0.9", content=png(x[0]), headers=PNG), 422, "validation_error")
    assert "alpha" in _error(client.post("/v1/detect?alpha=abc", content=png(x[0]), headers=PNG), 422, "validation_error")
    assert "200000" in _error(client.post("/v1/detect", content=b"\0" * 300_000, headers=PNG), 413, "payload_too_large")
    files = [("file", (f"{i}.png", png(x[0]), "image/png")) for i in range(9)]
    assert "limit is 8" in _error(client.post("/v1/detect", files=files), 413, "payload_too_large")
    assert "'file'" in _error(client.post("/v1/detect", files=[("other", ("a.png", png(x[0]), "image/png"))]), 400, "bad_request")
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/detect"), 405, "method_not_allowed")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width×height 8-bit gray pixels and carries one compressed row of them."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    data = _png_header_only(50_000, 50_000)  # 2.5 gigapixels in a few hundred bytes
    assert len(data) < 1000
    msg = _error(client.post("/v1/detect", content=data, headers=PNG), 413, "payload_too_large")
    assert "2500000000 pixels" in msg and "40000000" in msg  # Pillow's own bomb check answers first at this size


def test_pgd_digit_is_flagged_and_its_clean_source_is_not(client: TestClient, digits, mnist: Bundle) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    clean = x[2:3]
    adv = quantise(pgd_linf(mnist.model, clean, y[2:3], eps=0.3, steps=40))  # a few lines of PyTorch
    assert float((adv - clean).abs().max()) <= 0.3 + 0.5 / 255 + 1e-6  # 8-bit rounding may add half a level
    rc = client.post("/v1/detect", content=png(clean[0]), headers=PNG).json()["results"][0]
    ra = client.post("/v1/detect", content=png(adv[0]), headers=PNG).json()["results"][0]
    assert rc["predicted_class"] == int(y[2]) and not rc["decision"]["flagged"]
    assert ra["predicted_class"] != int(y[2]) and ra["decision"]["flagged"]


def test_model_info(client: TestClient, mnist: Bundle) -> None:
    m = client.get("/v1/model").json()
    assert m["card"] == mnist.card
    # n: the quarter that calibrates the minimum (part B of the calibration half, halved by the combination)
    assert m["calibration"]["n"] > 1200 and m["calibration"]["statistic"] == "combined"
    assert m["calibration"]["components"] == COMPONENTS and m["calibration"]["data"]["correct"] > 2450
    assert m["heatmaps"] == ["fis", "fisher_diag", "eigvec", "saliency"]
    assert m["batching"]["max_batch_size"] == 32
    values = client.get("/v1/model/calibration/fisher_input_trace").json()["values"]
    assert len(values) == m["calibration"]["data"]["correct"] and values == sorted(values)


def test_metrics_after_traffic(client: TestClient, digits) -> None:  # type: ignore[no-untyped-def]
    x, _ = digits
    client.post("/v1/detect", content=png(x[5]), headers=PNG)
    text = client.get("/metrics").text
    for name in [
        'fisherguard_requests_total{route="/v1/detect",status="200"}',
        "fisherguard_request_duration_seconds_bucket",
        'fisherguard_images_scored_total{model="mnist",outcome="ok"}',
        "fisherguard_batches_total",
        "fisherguard_batch_size_images_bucket",
        "fisherguard_queue_depth_images",
        "fisherguard_queue_wait_seconds_bucket",
        "fisherguard_compute_seconds_bucket",
        "fisherguard_images_flagged_total",
        "fisherguard_decision_p_value_bucket",
        'fisherguard_model_info{device="cpu",model="mnist",name="mnist",version="1.0.0"} 1.0',
        'fisherguard_model_ready{model="mnist"} 1.0',
        'fisherguard_errors_total{code="bad_image"}',
    ]:
        assert name in text, name


def test_docs_and_page(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/v1/detect" in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "FisherGuard" in page.text
    assert client.get("/static/app.js").status_code == 200
